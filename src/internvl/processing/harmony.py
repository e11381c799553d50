"""GPT-OSS's harmony reply format: `<|channel|>final<|message|>…<|return|>`, optionally after an analysis
message (`<|channel|>analysis<|message|>…<|end|><|start|>assistant<|channel|>final…`), followed token by token."""

from __future__ import annotations

from ..config import Template
from ..tokenizer import Tokenizer

FINAL_HEADER = "<|channel|>final<|message|>"  # what the training text puts before an assistant message
HEADER_TOKENS = ("<|channel|>", "<|message|>", "<|start|>", "<|end|>")


def is_harmony(template: Template) -> bool:
    """Whether replies under `template` are harmony messages (the GPT-OSS template: its assistant role stops
    at `<|start|>assistant`, before the channel)."""
    return template.roles[1].endswith("<|start|>assistant")


class ChannelRouter:
    """Says which channel each token of a reply belongs to: `route(token)` is "final", "analysis", ... for a
    token of a message's text, and None for the structure around it (headers, `<|end|>`, `<|start|>`).

    A reply that does not open with `<|channel|>` is not in harmony form: all of it counts as "final".
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.channel_id, self.message_id, self.start_id, self.end_id = (tokenizer.token_to_id(t) for t in HEADER_TOKENS)
        self.state = "open"  # open (first token) | header | message | between | plain
        self.header: list[int] = []
        self.channel = ""

    def route(self, token: int) -> str | None:
        if self.state == "open":
            self.state = "header" if token in (self.channel_id, self.start_id) else "plain"
        if self.state == "plain":
            return "final"
        if self.state == "message":
            if token == self.end_id:
                self.state = "between"
                return None
            return self.channel
        if self.state == "between":
            if token == self.start_id:
                self.state, self.header = "header", []
            return None
        # header: <|start|>assistant<|channel|>NAME [to=...]<|message|>
        if token == self.message_id:
            self.channel, self.state = self._channel_name(), "message"
        else:
            self.header.append(token)
        return None

    def _channel_name(self) -> str:
        ids = self.header
        if self.channel_id in ids:
            ids = ids[len(ids) - ids[::-1].index(self.channel_id) :]
        words = self.tok.decode(ids, skip_special_tokens=True).split()
        return words[0] if words else "final"
