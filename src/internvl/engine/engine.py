"""Generation engine on token ids: prefill into a KV cache, then batched decode with continuous batching.

`add()` queues a request, `step()` admits waiting requests (prefill) and decodes one token for every
running one. Each request keeps its own sampling settings, stop ids and random generator. Synchronous
`generate()`, detok.py (text, stop strings, streaming) and the HTTP server all drive the same loop.
Prompts that start like a recent one reuse its keys and values (`prefix_cache`); requests admitted together
of similar length share one prefill forward. With `isolate_failures` (the server's setting) a request whose
prefill or sampling fails ends alone with finish_reason "error"; otherwise the exception propagates.

The model is reached through new_cache(), prefill(), decode() and decoder_version() (model/vlm.py; a mock
in tests/test_engine_mock.py), image_token_id, num_image_token, device and config (the context length when
max_model_len is not given); the decode step, torch or the C kernels, is chosen once by accelerate.py.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from ..errors import PromptError
from ..model.cache import KVCache
from .accelerate import decode_step
from .prefill import PrefillRun
from .prefix_cache import Hit, PrefixCache
from .sampling import SamplingParams, greedy_batch, sample_next

_ids = itertools.count()
PREFILL_SPAN = 8  # most positions by which the prompts of one batched prefill may differ in length
PREFILL_TOKENS = 2048  # padded tokens of one batched prefill (a longer prompt goes alone)
CACHE_ROUND = 256  # row capacities are rounded up to this, so joining rows rarely resizes the cache


@dataclass
class Sequence:
    """One request and its state inside the engine."""

    prompt_ids: list[int]
    params: SamplingParams
    pixel_values: torch.Tensor | None = None  # released after the prefill
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    output_ids: list[int] = field(default_factory=list)  # the new tokens (a stop id excluded)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    generator: torch.Generator | None = None
    aborted: bool = False
    stop_ids: frozenset[int] = frozenset()
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    error: str | None = None  # why it ended with finish_reason "error"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class TokenEvent:
    seq: Sequence
    token_id: int | None  # None when the sequence ended without a new token (abort, error)
    finished: bool


class Engine:
    def __init__(self, model, max_batch: int = 16, max_model_len: int | None = None,
                 stop_token_ids: list[int] | None = None, prefix_cache: PrefixCache | bool = True):  # fmt: skip
        self.model = model
        self.decode_step = decode_step(model)  # (tokens [B], cache, valid_lengths) -> logits [B, vocab]
        self.prefill_run = PrefillRun.for_model(model)  # fp32 where the CPU emulates bf16; progress (prefill.py)
        self.max_batch = max_batch
        self.max_model_len = max_model_len or model.config.llm.context_length
        self.default_stop_ids = list(stop_token_ids or [])
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.cache: KVCache | None = None
        self.lock = threading.Lock()  # guards `waiting` against producers in other threads
        if prefix_cache is True:
            prefix_cache = PrefixCache(stop_token=model.image_token_id)
        self.prefix_cache: PrefixCache | None = prefix_cache or None
        self._weights_seen: tuple | None = None  # what the prefix cache was computed with
        self.isolate_failures = False  # a request failing in prefill or sampling ends alone ("error")

    # ---- requests ------------------------------------------------------------------------------

    def check(self, prompt_ids: list[int], params: SamplingParams | None = None,
              pixel_values: torch.Tensor | None = None) -> None:  # fmt: skip
        """Raise the PromptError add() would raise for this request, without queueing anything."""
        if not prompt_ids:
            raise PromptError("the prompt is empty")
        if len(prompt_ids) + 1 > self.max_model_len:
            raise PromptError(f"the prompt has {len(prompt_ids)} tokens but the model's context is "
                              f"{self.max_model_len} tokens")  # fmt: skip
        image_id = self.model.image_token_id
        n_ctx = list(prompt_ids).count(image_id) if image_id is not None else 0
        n_tiles = 0 if pixel_values is None else pixel_values.shape[0]
        if getattr(getattr(self.model, "config", None), "flash_mode", False):  # Flash: 1/4 or all, per tile
            if not n_tiles * self.model.num_image_token // 4 <= n_ctx <= n_tiles * self.model.num_image_token:
                raise PromptError(f"the prompt has {n_ctx} image context tokens, which {n_tiles} tile(s) cannot "
                                  "give (InternVL3.5-Flash: 1/4 or all of the tokens of each tile)")  # fmt: skip
        elif n_ctx != n_tiles * self.model.num_image_token:
            raise PromptError(f"the prompt has {n_ctx} image context tokens but {n_tiles} tile(s) were given "
                              f"({self.model.num_image_token} tokens per tile)")  # fmt: skip

    def add(self, prompt_ids: list[int], params: SamplingParams | None = None,
            pixel_values: torch.Tensor | None = None, request_id: str | None = None) -> Sequence:  # fmt: skip
        params = params or SamplingParams()
        prompt_ids = list(prompt_ids)
        self.check(prompt_ids, params, pixel_values)
        seq = Sequence(prompt_ids, params, pixel_values)
        seq.stop_ids = frozenset(params.stop_token_ids) | frozenset(self.default_stop_ids)
        if request_id:
            seq.request_id = request_id
        if params.seed is not None:
            seq.generator = torch.Generator().manual_seed(params.seed)
        with self.lock:
            self.waiting.append(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop a request at the next step (safe from another thread)."""
        seq.aborted = True

    def stop(self, seq: Sequence, at: int) -> None:
        """End a request as "stop" after its first `at` new tokens, for a stop the engine cannot see (a stop
        string in its text, detok.py); what it produced after them in the same step is dropped. Called
        between steps by the thread that runs them: its row leaves the batch at the next step."""
        del seq.output_ids[at:]
        seq.finish_reason, seq.error, seq.pixel_values = "stop", None, None

    def has_work(self) -> bool:
        return bool(self.waiting) or any(not s.finished for s in self.running)

    def reset(self) -> list[Sequence]:
        """Drop every waiting and running request (ended as "abort") and the batch's cache; returns them.
        For recovering from a failed step: the engine is then empty and usable (the prefix cache stays)."""
        with self.lock:
            dropped = list(self.waiting) + self.running
            self.waiting.clear()
        self.running, self.cache = [], None
        for seq in dropped:
            if not seq.finished:
                seq.finish_reason = "abort"
            seq.pixel_values = None
        return dropped

    def uncached_tokens(self, prompt_ids: list[int]) -> int:
        """Prompt tokens a prefill would compute now (the rest would come from the prefix cache)."""
        hit = self.prefix_cache.peek(prompt_ids) if self.prefix_cache is not None else 0
        return len(prompt_ids) - hit

    # ---- the loop ------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        self._drop_finished()  # rows stopped between steps
        with self.lock:
            dropped = [s for s in self.waiting if s.aborted]
            self.waiting = deque(s for s in self.waiting if not s.aborted)
            admitted = []
            while self.waiting and len(self.running) + len(admitted) < self.max_batch:
                admitted.append(self.waiting.popleft())
        events += [self._finish(s, None, "abort") for s in dropped]
        if admitted:
            events += self._prefill(admitted)
        if any(not s.finished for s in self.running):
            events += self._decode()
        self._drop_finished()
        return events

    def _prefill(self, seqs: list[Sequence]) -> list[TokenEvent]:
        """Prefix-cache lookups, then one forward per group of prompts of similar uncached length."""
        self._check_weights()
        plans = []
        for seq in seqs:
            hit = self.prefix_cache.lookup(seq.prompt_ids) if self.prefix_cache is not None else None
            plans.append((seq, hit))
        plans.sort(key=lambda p: len(p[0].prompt_ids) - (p[1].length if p[1] else 0))
        events, group = [], []
        # InternVL3.5-Flash routes a request's tiles together (a quantile over them): its images prefill alone
        flash = getattr(getattr(self.model, "config", None), "flash_mode", False)
        for plan in plans:
            rest = len(plan[0].prompt_ids) - (plan[1].length if plan[1] else 0)
            if group and flash and (plan[0].pixel_values is not None or group[-1][0].pixel_values is not None):
                events += self._prefill_isolated(group)
                group = []
            if group:
                first = len(group[0][0].prompt_ids) - (group[0][1].length if group[0][1] else 0)
                if rest - first >= PREFILL_SPAN or rest * (len(group) + 1) > PREFILL_TOKENS:
                    events += self._prefill_isolated(group)
                    group = []
            group.append(plan)
        return events + self._prefill_isolated(group)

    def _prefill_isolated(self, plans: list[tuple[Sequence, Hit | None]]) -> list[TokenEvent]:
        """A group's prefill; when it fails (and failures are isolated), each request again alone, so
        only the one that fails by itself ends. A failed forward has not touched the running batch."""
        try:
            return self._prefill_group(plans)
        except Exception as e:
            if not self.isolate_failures:
                raise
            if len(plans) == 1:
                return [self._fail(plans[0][0], e)]
        return [event for plan in plans for event in self._prefill_isolated([plan])]

    def _prefill_group(self, plans: list[tuple[Sequence, Hit | None]]) -> list[TokenEvent]:
        """Rows padded on the right to the longest uncached part; each row's logits at its last token."""
        dev = self.model.device
        starts = [hit.length if hit else 0 for _, hit in plans]
        rests = [len(seq.prompt_ids) - s for (seq, _), s in zip(plans, starts)]
        t = max(rests)
        need = max(len(seq.prompt_ids) + seq.params.max_new_tokens + 1 for seq, _ in plans)
        cache = self.model.new_cache(len(plans), capacity=-(-need // CACHE_ROUND) * CACHE_ROUND)
        pad = 0 if self.model.image_token_id != 0 else 1
        ids = torch.full((len(plans), t), pad, dtype=torch.long)
        for b, ((seq, hit), s) in enumerate(zip(plans, starts)):
            if hit is not None:
                self.prefix_cache.load(hit, cache, b)
                seq.cached_tokens = hit.length
            ids[b, : len(seq.prompt_ids) - s] = torch.tensor(seq.prompt_ids[s:])
        tiles = [seq.pixel_values for seq, _ in plans if seq.pixel_values is not None]
        pv = torch.cat(tiles).to(dev) if tiles else None
        keep = t - min(rests) + 1
        valid = torch.tensor(rests) if len(plans) > 1 else None
        if t == 1 and pv is None:  # one token per row (what the prefix cache left): a decode step
            logits = self.decode_step(ids[:, 0].to(dev), cache, valid)[:, None]
        else:
            with self.prefill_run(self.model, sum(rests), 0 if pv is None else pv.shape[0]):
                logits = self.model.prefill(ids.to(dev), pv, cache, valid, keep)
        rows = logits[torch.arange(len(plans)), torch.tensor(rests) - 1 - (t - keep)]
        for b, (seq, _) in enumerate(plans):
            seq.pixel_values = None
            if self.prefix_cache is not None:
                self.prefix_cache.store(seq.prompt_ids, cache, b)
        if self.cache is None:
            self.cache = cache
        else:
            self.cache.concat(cache)
        seqs = [seq for seq, _ in plans]
        self.running += seqs
        return self._accept_all(seqs, rows)

    def _decode(self) -> list[TokenEvent]:
        events = [self._finish(s, None, "abort") for s in self.running if s.aborted and not s.finished]
        live = [s for s in self.running if not s.finished]
        if not live:
            return events
        # the cache is one batch, so every running row takes part in the forward; finished rows
        # (ended in this step's prefill or aborted) do not advance and do not sample
        last = [s.output_ids[-1] if s.output_ids else s.prompt_ids[-1] for s in self.running]
        step_rows = torch.tensor([0 if s.finished else 1 for s in self.running])
        logits = self.decode_step(torch.tensor(last, device=self.model.device), self.cache, step_rows)
        if len(live) < len(self.running):
            logits = logits[[i for i, s in enumerate(self.running) if not s.finished]]
        return events + self._accept_all(live, logits)

    def _accept_all(self, seqs: list[Sequence], logits: torch.Tensor) -> list[TokenEvent]:
        """Next tokens for seqs from logits [len(seqs), vocab]: one batched argmax serves every greedy row
        without a repetition penalty (unless it picks a stop that min_new_tokens suppresses)."""
        plain = [s.params.plain_greedy for s in seqs]
        top = greedy_batch(logits) if any(plain) else None
        events = []
        for i, seq in enumerate(seqs):
            suppress = len(seq.output_ids) < seq.params.min_new_tokens
            try:
                if plain[i] and not (suppress and top[i] in seq.stop_ids):
                    token = top[i]
                else:
                    token = sample_next(logits[i], seq.params, seq.output_ids, seq.generator,
                                        sorted(seq.stop_ids) if suppress else None)  # fmt: skip
                events.append(self._accept(seq, token))
            except Exception as e:
                if not self.isolate_failures:
                    raise
                events.append(self._fail(seq, e))
        return events

    def _accept(self, seq: Sequence, token: int) -> TokenEvent:
        if token in seq.stop_ids:
            return self._finish(seq, token, "stop")
        seq.output_ids.append(token)
        if len(seq.output_ids) >= seq.params.max_new_tokens:
            return self._finish(seq, token, "length")
        if len(seq.prompt_ids) + len(seq.output_ids) + 1 >= self.max_model_len:
            return self._finish(seq, token, "length")
        return TokenEvent(seq, token, False)

    def _finish(self, seq: Sequence, token: int | None, reason: str) -> TokenEvent:
        seq.finish_reason = reason
        seq.pixel_values = None
        return TokenEvent(seq, token, True)

    def _fail(self, seq: Sequence, error: Exception) -> TokenEvent:
        """End one request on its own failure; the rest of the batch goes on."""
        seq.error = f"{type(error).__name__}: {error}"
        seq.finish_reason = "error"
        seq.pixel_values = None
        return TokenEvent(seq, None, True)

    def _drop_finished(self) -> None:
        """Finished rows leave; the last running rows move into their slots (only those rows are copied)."""
        n = sum(not s.finished for s in self.running)
        if n == len(self.running):
            return
        if n == 0:
            self.running, self.cache = [], None
            return
        order = list(range(n))
        movers = (i for i in range(n, len(self.running)) if not self.running[i].finished)
        for hole in (i for i in range(n) if self.running[i].finished):
            order[hole] = next(movers)
        self.running = [self.running[i] for i in order]
        self.cache.keep(order)

    def _check_weights(self) -> None:
        """Forget cached prefixes when the language model's tensors were replaced or changed in place."""
        if self.prefix_cache is None:
            return
        seen = self.model.decoder_version()
        if seen != self._weights_seen:
            self.prefix_cache.clear()
            self._weights_seen = seen

    # ---- synchronous helpers ------------------------------------------------------------------

    def generate(self, requests: list[tuple[list[int], SamplingParams | None, torch.Tensor | None]]) -> list[Sequence]:
        """Run (prompt_ids, params, pixel_values) requests to completion, batched; results in input order."""
        seqs = [self.add(ids, params, pv) for ids, params, pv in requests]
        while any(not s.finished for s in seqs):
            self.step()
        return seqs
