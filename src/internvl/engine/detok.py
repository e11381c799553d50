"""Detokenization: the engine's token ids become text deltas, cut at the request's stop strings.

`TextStream` follows one request's tokens. `Detokenizer` drives an engine for callers that want text (the
Python API, the server, evaluation): its events carry text, and a request whose text reaches one of its
stop strings is ended there (`Engine.stop`). The engine itself never sees text. Under a harmony template
(GPT-OSS) the text is the final channel's message only; the analysis channel's goes to `reasoning`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..processing.harmony import ChannelRouter
from ..tokenizer import IncrementalDecoder, Tokenizer
from .engine import Engine
from .engine import Sequence as Request
from .sampling import SamplingParams


class TextStream:
    """The text of one request's output ids, its first stop string and what follows removed, handed out in
    deltas that never show part of a stop string (a tail that could still become one is held back)."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), harmony: bool = False):
        self.decoder = IncrementalDecoder(tokenizer)
        self.router = ChannelRouter(tokenizer) if harmony else None  # harmony: only "final" tokens are text
        self.thinking = IncrementalDecoder(tokenizer)
        self.reasoning = ""  # the analysis channel's text (harmony only)
        self.stop = list(stop)
        self.text = ""
        self.emitted = 0  # characters of `text` already handed out
        self.tokens = 0  # tokens pushed up to the stop string (all of them when there is none)
        self.stopped = False  # a stop string was found: `text` ends before it

    def push(self, token: int) -> None:
        """Decode one more token; nothing after a stop string counts."""
        if self.stopped:
            return
        self.tokens += 1
        channel = "final" if self.router is None else self.router.route(token)
        if channel != "final":
            if channel == "analysis":
                self.reasoning += self.thinking.push(token)
            return
        self.text += self.decoder.push(token)
        for s in self.stop:
            cut = self.text.find(s, max(0, self.emitted - len(s)))
            if cut >= 0:
                self.text, self.stopped = self.text[:cut], True
                return

    def delta(self, final: bool = False) -> str:
        """Text not handed out yet; unless `final`, without a tail that could still become a stop string."""
        safe = len(self.text)
        if not final:
            for s in self.stop:
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        safe = min(safe, len(self.text) - k)
                        break
        out = self.text[self.emitted : max(safe, self.emitted)]
        self.emitted = max(safe, self.emitted)
        return out

    def end(self, flush: bool) -> str:
        """The last delta; `flush` adds what the decoder still holds (an incomplete character)."""
        if flush and not self.stopped:
            self.text += self.decoder.flush()
        return self.delta(final=True)


@dataclass
class TextEvent:
    seq: Request
    token_id: int | None
    text: str  # new text that is safe to show
    finished: bool
    output: str  # all the text so far (the answer, once finished)
    reasoning: str = ""  # harmony: the analysis channel's text so far


@dataclass
class Completion:
    seq: Request  # output_ids, finish_reason, cached_tokens, error
    text: str
    reasoning: str = ""  # harmony: the analysis channel's text


class Detokenizer:
    """Text for the requests of one engine: `add`, `step`, `generate` and `stream` as the engine's, with text.
    `harmony`: the replies are GPT-OSS harmony messages, whose text is the final channel's message."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, harmony: bool = False):
        self.engine, self.tokenizer = engine, tokenizer
        self.harmony = harmony  # replies are harmony messages (GPT-OSS): text is the final channel's
        self.streams: dict[str, TextStream] = {}  # by request id, until the request ends

    def add(self, prompt_ids: list[int], params: SamplingParams | None = None,
            pixel_values: torch.Tensor | None = None, request_id: str | None = None) -> Request:  # fmt: skip
        seq = self.engine.add(prompt_ids, params, pixel_values, request_id)
        self.streams[seq.request_id] = TextStream(self.tokenizer, seq.params.stop, self.harmony)
        return seq

    def step(self) -> list[TextEvent]:
        """Engine.step() in text. A request can have two events in one step (its prefill's token and the
        next one): once its text reaches a stop string, the engine ends it there and its later events go."""
        events, ended = [], set()
        for e in self.engine.step():
            if e.seq.request_id not in ended:
                events.append(self._text(e.seq, e.token_id, e.finished))
                if events[-1].finished:
                    ended.add(e.seq.request_id)
        return events

    def abort(self, seq: Request) -> None:
        self.engine.abort(seq)

    def reset(self) -> list[Request]:
        """Engine.reset(), and the texts of the dropped requests forgotten."""
        self.streams.clear()
        return self.engine.reset()

    def _text(self, seq: Request, token_id: int | None, finished: bool) -> TextEvent:
        stream = self.streams.get(seq.request_id)
        if stream is None:  # a request added to the engine directly: no text
            return TextEvent(seq, token_id, "", finished, "")
        if token_id is not None and token_id not in seq.stop_ids:  # the token joined the output
            stream.push(token_id)
            if stream.stopped:
                self.engine.stop(seq, stream.tokens)
                finished = True
        if not finished:
            return TextEvent(seq, token_id, stream.delta(), False, stream.text, stream.reasoning)
        del self.streams[seq.request_id]
        if seq.finish_reason == "error":
            return TextEvent(seq, token_id, "", True, stream.text, stream.reasoning)
        text = stream.end(flush=seq.finish_reason != "stop")  # a stop (id or string) ends the text as it is
        return TextEvent(seq, token_id, text, True, stream.text, stream.reasoning)

    def generate(self, requests: list[tuple[list[int], SamplingParams | None, torch.Tensor | None]]) -> list[Completion]:
        """Run (prompt_ids, params, pixel_values) requests to completion, batched; results in input order."""
        seqs = [self.add(ids, params, pv) for ids, params, pv in requests]
        done: dict[str, TextEvent] = {}
        while any(not s.finished for s in seqs):
            done.update((e.seq.request_id, e) for e in self.step() if e.finished)
        return [Completion(s, done[s.request_id].output, done[s.request_id].reasoning) if s.request_id in done
                else Completion(s, "") for s in seqs]  # fmt: skip

    def stream(self, prompt_ids: list[int], params: SamplingParams | None = None,
               pixel_values: torch.Tensor | None = None) -> Iterator[TextEvent]:  # fmt: skip
        """Events of one request as they are produced (other queued requests advance too)."""
        seq = self.add(prompt_ids, params, pixel_values)
        try:
            while not seq.finished:
                for event in self.step():
                    if event.seq is seq:
                        yield event
        finally:
            if not seq.finished:
                self.abort(seq)
