"""`internvl serve`: an OpenAI-compatible HTTP server (chat completions, SSE) with a web chat page; see app.py."""
