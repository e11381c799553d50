"""Generation engine on token ids: prefill into a KV cache, then batched decode with continuous batching.

`add()` queues a request, `step()` admits waiting requests (prefill) and decodes one token for every
running one. Each request keeps its own sampling settings, stops and random generator. Synchronous
`generate()`/`stream()` and the HTTP server all drive the same loop.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..errors import PromptError
from ..model.cache import KVCache
from ..model.vlm import InternVLChatModel
from ..tokenizer import IncrementalDecoder, Tokenizer
from .sampling import SamplingParams, sample_next

_ids = itertools.count()


@dataclass
class Sequence:
    """One request and its state inside the engine."""

    prompt_ids: list[int]
    params: SamplingParams
    pixel_values: torch.Tensor | None = None
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # generated text, stop string removed
    emitted: int = 0  # characters of `text` already handed out as deltas
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    generator: torch.Generator | None = None
    decoder: IncrementalDecoder | None = None
    aborted: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class TokenEvent:
    seq: Sequence
    token_id: int | None  # None when the sequence ended without a new token (abort)
    text: str  # new text that is safe to show (no partial stop string)
    finished: bool


class Engine:
    def __init__(self, model: InternVLChatModel, tokenizer: Tokenizer | None = None, max_batch: int = 16,
                 max_model_len: int | None = None, stop_token_ids: list[int] | None = None):  # fmt: skip
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_model_len = max_model_len or model.config.llm.max_position_embeddings
        self.default_stop_ids = list(stop_token_ids or [])
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.cache: KVCache | None = None
        self.lock = threading.Lock()  # guards `waiting` against producers in other threads

    # ---- requests ------------------------------------------------------------------------------

    def add(self, prompt_ids: list[int], params: SamplingParams | None = None,
            pixel_values: torch.Tensor | None = None, request_id: str | None = None) -> Sequence:  # fmt: skip
        params = params or SamplingParams()
        if not prompt_ids:
            raise PromptError("the prompt is empty")
        if len(prompt_ids) + 1 > self.max_model_len:
            raise PromptError(f"the prompt has {len(prompt_ids)} tokens but the model's context is "
                              f"{self.max_model_len} tokens")  # fmt: skip
        image_id = self.model.image_token_id
        n_ctx = sum(1 for t in prompt_ids if t == image_id) if image_id is not None else 0
        n_tiles = 0 if pixel_values is None else pixel_values.shape[0]
        if n_ctx != n_tiles * self.model.num_image_token:
            raise PromptError(f"the prompt has {n_ctx} image context tokens but {n_tiles} tile(s) were given "
                              f"({self.model.num_image_token} tokens per tile)")  # fmt: skip
        seq = Sequence(list(prompt_ids), params, pixel_values)
        if request_id:
            seq.request_id = request_id
        if params.seed is not None:
            seq.generator = torch.Generator().manual_seed(params.seed)
        if self.tokenizer is not None:
            seq.decoder = IncrementalDecoder(self.tokenizer)
        with self.lock:
            self.waiting.append(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop a request at the next step (safe from another thread)."""
        seq.aborted = True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the loop ------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        with self.lock:
            dropped = [s for s in self.waiting if s.aborted]
            self.waiting = deque(s for s in self.waiting if not s.aborted)
        events += [self._finish(s, None, "abort") for s in dropped]
        while len(self.running) < self.max_batch:
            with self.lock:
                if not self.waiting:
                    break
                seq = self.waiting.popleft()
            events.append(self._prefill(seq))
        if any(not s.finished for s in self.running):
            events += self._decode()
        self._drop_finished()
        return events

    def _prefill(self, seq: Sequence) -> TokenEvent:
        lm = self.model.language_model
        ids = torch.tensor([seq.prompt_ids], device=self.model.device)
        cache = lm.new_cache(1, capacity=len(seq.prompt_ids) + seq.params.max_new_tokens + 1)
        pv = None if seq.pixel_values is None else seq.pixel_values.to(self.model.device)
        logits = self.model(ids, pixel_values=pv, cache=cache, logits_to_keep=1).logits[0, -1]
        if self.cache is None:
            self.cache = cache
        else:
            self.cache.concat(cache)
        self.running.append(seq)
        return self._accept(seq, logits)

    def _decode(self) -> list[TokenEvent]:
        events = [self._finish(s, None, "abort") for s in self.running if s.aborted and not s.finished]
        if all(s.finished for s in self.running):
            return events
        # the cache is one batch, so every running row takes part in the forward; finished rows
        # (ended in this step's prefill or aborted) do not advance and do not sample
        last = [s.output_ids[-1] if s.output_ids else s.prompt_ids[-1] for s in self.running]
        tokens = torch.tensor(last, device=self.model.device)[:, None]
        emb = self.model.language_model.model.embed_tokens(tokens)
        step_rows = torch.tensor([0 if s.finished else 1 for s in self.running])
        logits = self.model.language_model(emb, cache=self.cache, valid_lengths=step_rows)[:, -1]
        events += [self._accept(s, logits[i]) for i, s in enumerate(self.running) if not s.finished]
        return events

    def _accept(self, seq: Sequence, logits: torch.Tensor) -> TokenEvent:
        p = seq.params
        stop_ids = set(p.stop_token_ids) | set(self.default_stop_ids)
        suppress = sorted(stop_ids) if len(seq.output_ids) < p.min_new_tokens else None
        token = sample_next(logits, p, seq.output_ids, seq.generator, suppress)
        if token in stop_ids:
            return self._finish(seq, token, "stop")
        seq.output_ids.append(token)
        if seq.decoder is not None:
            seq.text += seq.decoder.push(token)
            for s in p.stop:
                cut = seq.text.find(s, max(0, seq.emitted - len(s)))
                if cut >= 0:
                    seq.text = seq.text[:cut]
                    return self._finish(seq, token, "stop")
        if len(seq.output_ids) >= p.max_new_tokens:
            return self._finish(seq, token, "length")
        if len(seq.prompt_ids) + len(seq.output_ids) + 1 >= self.max_model_len:
            return self._finish(seq, token, "length")
        return TokenEvent(seq, token, self._delta(seq, final=False), False)

    def _finish(self, seq: Sequence, token: int | None, reason: str) -> TokenEvent:
        seq.finish_reason = reason
        if seq.decoder is not None and reason != "stop":
            seq.text += seq.decoder.flush()
        return TokenEvent(seq, token, self._delta(seq, final=True), True)

    def _delta(self, seq: Sequence, final: bool) -> str:
        """New text, holding back a tail that could still become a stop string."""
        safe = len(seq.text)
        if not final:
            for s in seq.params.stop:
                for k in range(min(len(s) - 1, len(seq.text)), 0, -1):
                    if seq.text.endswith(s[:k]):
                        safe = min(safe, len(seq.text) - k)
                        break
        out = seq.text[seq.emitted : max(safe, seq.emitted)]
        seq.emitted = max(safe, seq.emitted)
        return out

    def _drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self.running) if not s.finished]
        if len(keep) == len(self.running):
            return
        self.running = [self.running[i] for i in keep]
        if keep:
            self.cache.keep(keep)
        else:
            self.cache = None

    # ---- synchronous helpers ------------------------------------------------------------------

    def generate(self, requests: list[tuple[list[int], SamplingParams | None, torch.Tensor | None]]) -> list[Sequence]:
        """Run (prompt_ids, params, pixel_values) requests to completion, batched; results in input order."""
        seqs = [self.add(ids, params, pv) for ids, params, pv in requests]
        while any(not s.finished for s in seqs):
            self.step()
        return seqs

    def stream(self, prompt_ids: list[int], params: SamplingParams | None = None,
               pixel_values: torch.Tensor | None = None) -> Iterator[TokenEvent]:  # fmt: skip
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
