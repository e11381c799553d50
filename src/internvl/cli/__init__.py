"""The `internvl` command: one console script with verbs."""
