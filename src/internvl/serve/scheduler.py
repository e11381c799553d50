"""The engine thread and its asyncio bridge: requests in from the event loop, token events back out.

One thread owns `Engine.step()`. New requests are checked by the engine, wait in a queue here and join the
running batch a few at a time (a budget of prompt tokens to compute per step; tokens the engine's prefix
cache holds cost nothing), so a burst of arrivals delays the running streams by a bounded amount.
Cancelling a request (client gone, time-out) removes it from the queue or aborts it in the engine.
A request that fails on its own (its prefill, its sampling, its admission) ends alone with an error; a step
that fails as a whole fails the batch; the thread survives both, and restarts itself if anything else escapes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter, deque
from dataclasses import dataclass, field

import torch

from ..engine.detok import Detokenizer
from ..engine.engine import Sequence
from ..engine.sampling import SamplingParams
from ..errors import InternVLError
from .guard import release_free_memory
from .schemas import APIError

log = logging.getLogger("internvl.serve")


@dataclass
class Update:
    """What the engine thread sends to a request: a text delta, or the end (finish_reason) or an error."""

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: APIError | None = None


@dataclass
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    pixel_values: torch.Tensor | None
    loop: asyncio.AbstractEventLoop
    updates: asyncio.Queue = field(default_factory=asyncio.Queue)
    seq: Sequence | None = None
    done: bool = False

    def send(self, update: Update) -> None:
        """Thread-safe hand-over to the request's event loop (a closed loop means nobody is listening)."""
        if update.finish_reason or update.error:
            self.done = True
        try:
            self.loop.call_soon_threadsafe(self.updates.put_nowait, update)
        except RuntimeError:
            pass


class Scheduler:
    def __init__(self, detok: Detokenizer, prefill_budget: int = 512, max_queue: int = 256):
        self.detok, self.engine = detok, detok.engine  # the engine's steps go through its detokenizer
        self.engine.isolate_failures = True  # one request's failure must not end its neighbours
        self.prefill_budget = prefill_budget  # prompt tokens admitted per step (at least one request)
        self.max_queue = max_queue  # requests waiting for a batch slot; more are refused with 429
        self.pending: deque[Request] = deque()
        self.active: dict[str, Request] = {}  # admitted into the engine, by request id
        self.cond = threading.Condition()
        self.stopping = False
        self.steps = 0
        self.finished: Counter[str] = Counter()  # requests ended in the engine, by finish reason
        self.dropped = 0  # requests cancelled while still queued
        self.restarts = 0  # times the engine loop failed outside a step and was started again
        self.thread = self._new_thread()

    # ---- called from the event loop -------------------------------------------------------------

    def _new_thread(self) -> threading.Thread:
        return threading.Thread(target=self._run, name="internvl-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def alive(self) -> bool:
        """Whether the engine thread runs; a dead one (which `_run` should never allow) is started again."""
        with self.cond:
            if self.thread.is_alive():
                return True
            if self.stopping or self.thread.ident is None:  # stopped, or not started yet
                return False
            log.error("the engine thread had died; starting a new one")
            self.restarts += 1
            self.thread = self._new_thread()
            self.thread.start()
            return self.thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout)

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
               pixel_values: torch.Tensor | None) -> Request:  # fmt: skip
        try:
            self.engine.check(prompt_ids, params, pixel_values)
        except InternVLError as e:
            raise APIError(400, str(e), code="invalid_prompt") from None
        req = Request(request_id, prompt_ids, params, pixel_values, asyncio.get_running_loop())
        self.alive()
        with self.cond:
            if self.stopping:
                raise APIError(503, "the server is shutting down", code="shutting_down")
            if len(self.pending) >= self.max_queue:
                raise APIError(429, f"the server is busy: {len(self.pending)} requests are already waiting; "
                                    "retry later", code="server_busy", type="rate_limit_error")  # fmt: skip
            self.pending.append(req)
            self.cond.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Drop a request that is no longer wanted; idempotent and safe at any stage."""
        with self.cond:
            if req.done:
                return
            if req.seq is None:
                try:
                    self.pending.remove(req)
                    self.dropped += 1
                except ValueError:
                    pass
                req.done = True
                return
            self.engine.abort(req.seq)
            self.cond.notify()

    def stats(self) -> dict[str, int]:
        return {"running": len(self.engine.running), "waiting": len(self.pending) + len(self.engine.waiting),
                "steps": self.steps, "finished": dict(self.finished), "dropped": self.dropped,
                "restarts": self.restarts}  # fmt: skip

    # ---- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        """The thread's body: the loop, started again (its requests failed) if an error escapes it."""
        while True:
            try:
                return self._loop()
            except Exception as e:
                log.exception("the engine loop failed; restarting it")
                self.restarts += 1
                self._fail_all(APIError(500, f"generation failed: {type(e).__name__}: {e}", code="engine_error"))

    def _loop(self) -> None:
        idle = True
        while True:
            with self.cond:
                while not self.stopping and not self.pending and not self.engine.has_work():
                    if not idle:
                        idle = True
                        release_free_memory()
                    self.cond.wait()
                if self.stopping:
                    break
                self._admit()
            idle = False
            try:
                events = self.detok.step()
            except Exception as e:  # a failing step must not kill the thread or leave a broken batch behind
                log.exception("engine step failed")
                self._fail_all(
                    APIError(500, f"generation failed: {type(e).__name__}: {e}", code="engine_error")
                )
                continue
            self.steps += 1
            for ev in events:
                req = self.active.get(ev.seq.request_id)
                if req is None:
                    continue
                if ev.finished:
                    del self.active[ev.seq.request_id]
                    self.finished[ev.seq.finish_reason] += 1
                    if ev.seq.finish_reason == "error":
                        req.send(Update(error=APIError(500, f"generation failed for this request: {ev.seq.error}",
                                                       code="generation_error")))  # fmt: skip
                        continue
                    req.send(Update(ev.text, ev.seq.finish_reason, len(ev.seq.output_ids)))
                elif ev.text:
                    req.send(Update(ev.text))
        self._fail_all(APIError(503, "the server is shutting down", code="shutting_down"))

    def _admit(self) -> None:
        """Move queued requests into the engine while batch slots and this step's prefill budget allow."""
        free = self.engine.max_batch - len(self.engine.running) - len(self.engine.waiting)
        tokens = 0
        while self.pending and free > 0:
            n = self.engine.uncached_tokens(self.pending[0].prompt_ids)
            if tokens and tokens + n > self.prefill_budget:
                break
            req = self.pending.popleft()
            try:
                req.seq = self.detok.add(req.prompt_ids, req.params, req.pixel_values, request_id=req.id)
            except InternVLError as e:  # submit() checked the prompt; this is a last line of defence
                req.send(Update(error=APIError(400, str(e), code="invalid_prompt")))
                continue
            except Exception as e:  # e.g. a seed torch refuses: this request fails, the queue goes on
                log.exception("admitting request %s failed", req.id)
                req.send(Update(error=APIError(500, f"the request could not start: {type(e).__name__}: {e}",
                                               code="generation_error")))  # fmt: skip
                continue
            req.pixel_values = None  # the sequence holds them until its prefill
            self.active[req.id] = req
            tokens += n
            free -= 1

    def _fail_all(self, error: APIError) -> None:
        with self.cond:
            victims = list(self.active.values()) + list(self.pending)
            self.active.clear()
            self.pending.clear()
            self.detok.reset()
        for req in victims:
            req.send(Update(error=error))
