"""The FastAPI app: OpenAI-compatible `/v1/chat/completions` and `/v1/models`, `/health`, and the chat page.

A request flows: JSON -> `ChatCompletionRequest` (parse.py) -> conversation -> images and prompt ids (in
worker threads, with a time limit) -> `Scheduler` (the engine thread) -> text deltas -> one `chat.completion`
or an SSE stream of chunks. Every failure is a JSON error; once a stream has begun, an error event and [DONE].
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from ..engine.sampling import SamplingParams
from ..errors import ImageError, InternVLError
from .conversation import Conversation, build_inputs, parse_messages
from .guard import Guard
from .media import MediaPolicy, open_image
from .parse import parse_request
from .scheduler import Request as Job
from .scheduler import Scheduler
from .schemas import (
    APIError,
    ChatCompletionRequest,
    chunk,
    completion,
    error_body,
    model_card,
    new_id,
    openapi,
    usage,
)

log = logging.getLogger("internvl.serve")
STATIC = Path(__file__).parent / "static"


@dataclass
class ServeSettings:
    model_name: str = "internvl"
    api_key: str | None = None
    max_images: int = 8  # per request
    max_body_bytes: int = 32 * 1024 * 1024
    max_tokens_cap: int = 2048  # the largest max_tokens a request may ask for, and the default
    timeout: float = 600.0  # seconds per request, queueing included
    prefill_budget: int = 512  # prompt tokens admitted into the running batch per engine step
    max_queue: int = 256  # requests waiting for a batch slot before new ones get 429
    preprocess_threads: int = 2  # image decoding and tiling run here, off the event loop
    preprocess_timeout: float = 60.0  # seconds to decode a request's images and tokenize its prompt
    max_prompt_chars: int | None = None  # text characters per request; None: 32 per token of context
    media: MediaPolicy = field(default_factory=MediaPolicy)

    def prompt_chars(self, context: int) -> int:
        # no token of a real vocabulary holds 32 characters on average, so a longer text cannot fit
        return self.max_prompt_chars if self.max_prompt_chars is not None else 32 * context


def create_app(llm, settings: ServeSettings | None = None) -> FastAPI:
    """The app serving a loaded `InternVL`. The engine thread starts and stops with the app's lifespan."""
    settings = settings or ServeSettings()
    scheduler = Scheduler(llm.detok, settings.prefill_budget, settings.max_queue)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.limiter = anyio.CapacityLimiter(settings.preprocess_threads)
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="InternVL", description="OpenAI-compatible chat completions for InternVL models",
                  lifespan=lifespan, docs_url="/docs", redoc_url=None)  # fmt: skip
    app.state.scheduler, app.state.settings, app.state.llm = scheduler, settings, llm
    app.add_middleware(Guard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)
    app.openapi = lambda: app.openapi_schema or openapi(app)
    _error_handlers(app)

    @app.get("/health")
    async def health():
        if not scheduler.alive():
            return JSONResponse({"status": "engine stopped", "model": settings.model_name}, status_code=503)
        return {"status": "ok", "model": settings.model_name, **scheduler.stats()}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [model_card(settings.model_name, llm.engine.max_model_len, created)],
        }

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != settings.model_name:
            raise _unknown_model(model_id, settings.model_name)
        return model_card(settings.model_name, llm.engine.max_model_len, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_request(await request.body(), settings.prompt_chars(llm.engine.max_model_len))
        if req.model and req.model != settings.model_name:
            raise _unknown_model(req.model, settings.model_name)
        conv = parse_messages(req.messages)
        if len(conv.images) > settings.max_images:
            raise APIError(400, f"the request has {len(conv.images)} images, above this server's limit of "
                                f"{settings.max_images} (--max-images)", param="messages", code="too_many_images")  # fmt: skip
        ids, pixel_values = await _prepare(request, llm, conv, settings)
        params = _sampling(llm, req, len(ids), settings.max_tokens_cap)
        rid = new_id()
        job = scheduler.submit(rid, ids, params, pixel_values)
        deadline = asyncio.get_running_loop().time() + settings.timeout
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            body = _stream(job, settings, deadline, include_usage)
            return _EventStream(body, on_close=lambda: scheduler.cancel(job))
        return await _complete(request, scheduler, job, settings, deadline)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


# ---- request -> engine inputs -------------------------------------------------------------------


async def _prepare(request: Request, llm, conv: Conversation, settings: ServeSettings):
    """Images decoded and the prompt tokenized in a worker thread, given up after `preprocess_timeout`
    (the thread then finishes on its own; the size limits bound how long that can take)."""
    try:
        with anyio.fail_after(settings.preprocess_timeout):
            return await anyio.to_thread.run_sync(_inputs, llm, conv, settings.media, abandon_on_cancel=True,
                                                  limiter=request.app.state.limiter)  # fmt: skip
    except TimeoutError:
        raise APIError(408, f"decoding the images and tokenizing the prompt took longer than "
                            f"{settings.preprocess_timeout:g} s; send smaller images or a shorter prompt",
                       code="timeout") from None  # fmt: skip


def _inputs(llm, conv: Conversation, policy: MediaPolicy):
    images = []
    for ref in conv.images:
        try:
            images.append(open_image(ref.url, policy))
        except ImageError as e:
            raise APIError(
                400, f"{ref.param}: {e}", param=f"{ref.param}.image_url", code="invalid_image"
            ) from None
    try:
        return build_inputs(llm, conv, images)
    except InternVLError as e:
        raise APIError(400, str(e), param="messages", code="invalid_prompt") from None


def _sampling(llm, req: ChatCompletionRequest, prompt_tokens: int, cap: int) -> SamplingParams:
    context = llm.engine.max_model_len
    room = context - prompt_tokens - 1  # the engine keeps one position free
    asked = req.max_completion_tokens or req.max_tokens
    if room < 1 or (asked or 0) > room:
        raise APIError(400, f"this model's context is {context} tokens, but the request needs {prompt_tokens} for "
                            f"the messages (images included) and {asked or 1} for the completion; shorten the "
                            f"messages, send fewer or smaller images (max_dynamic_patch) or lower max_tokens",
                       param="messages" if room < 1 else "max_tokens", code="context_length_exceeded")  # fmt: skip
    if asked is not None and asked > cap:
        raise APIError(400, f"max_tokens is {asked}, above this server's cap of {cap} (--max-tokens-cap)",
                       param="max_tokens", code="max_tokens_too_large")  # fmt: skip
    return req.sampling(llm.defaults, asked or min(cap, room))


# ---- engine updates -> replies ------------------------------------------------------------------


async def _updates(job: Job, deadline: float):
    """The job's updates until it ends; asyncio.TimeoutError past the deadline."""
    loop = asyncio.get_running_loop()
    while True:
        update = await asyncio.wait_for(job.updates.get(), max(0.0, deadline - loop.time()))
        yield update
        if update.finish_reason or update.error:
            return


def _timeout_error(settings: ServeSettings) -> APIError:
    return APIError(408, f"the request did not finish within {settings.timeout:g} s (--timeout); its generation "
                         "was cancelled", code="timeout")  # fmt: skip


async def _complete(
    request: Request, scheduler: Scheduler, job: Job, settings: ServeSettings, deadline: float
):
    async def collect():
        parts = []
        async for u in _updates(job, deadline):
            if u.error:
                raise u.error
            parts.append(u.text)
        return "".join(parts).lstrip(), u.finish_reason, u.completion_tokens

    work = asyncio.ensure_future(collect())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():  # the client left: nobody will read the answer
            return Response(status_code=499)
        try:
            text, finish_reason, n = work.result()
        except asyncio.TimeoutError:
            raise _timeout_error(settings) from None
        return completion(job.id, settings.model_name, text, finish_reason, len(job.prompt_ids), n)
    finally:
        work.cancel()
        gone.cancel()
        scheduler.cancel(job)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _EventStream(StreamingResponse):
    """An SSE response that runs `on_close` however it ends: done, failed, or the client hung up (even
    before the body generator started, when the generator's own `finally` would never run)."""

    def __init__(self, body, on_close):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _stream(job: Job, settings: ServeSettings, deadline: float, include_usage: bool):
    """Server-sent events: the role, content deltas, the finish reason, the usage if asked, then [DONE]."""
    created, name = int(time.time()), settings.model_name

    def event(delta, finish_reason=None):
        return _sse(chunk(job.id, name, created, delta, finish_reason, with_usage=include_usage))

    yield event({"role": "assistant", "content": ""})
    started = False
    try:  # from here on the status line is sent: every failure becomes an error event, then [DONE]
        async for u in _updates(job, deadline):
            if u.error:
                yield _sse(u.error.body())
                break
            text = u.text if started else u.text.lstrip()
            started = started or bool(text)
            if text:
                yield event({"content": text})
            if u.finish_reason:
                yield event({}, u.finish_reason)
                if include_usage:
                    n = u.completion_tokens
                    yield _sse(chunk(job.id, name, created, None, usage_=usage(len(job.prompt_ids), n),
                                     with_usage=True))  # fmt: skip
    except asyncio.TimeoutError:
        yield _sse(_timeout_error(settings).body())
    except Exception as e:
        log.exception("streaming failed")
        yield _sse(error_body(f"internal server error: {type(e).__name__}: {e}", "server_error"))
    yield b"data: [DONE]\n\n"


def _sse(obj: dict) -> bytes:
    return b"data: " + _json_bytes(obj) + b"\n\n"


def _json_bytes(obj: dict) -> bytes:
    """UTF-8 JSON; with \\u escapes where a string cannot be encoded (a lone surrogate)."""
    try:
        return json.dumps(obj, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(obj).encode()


# ---- errors -------------------------------------------------------------------------------------


def _unknown_model(asked: str, served: str) -> APIError:
    shown = repr(asked) if len(asked) <= 200 else repr(asked[:200]) + "..."
    return APIError(404, f"the model {shown} does not exist; this server serves {served!r} (see GET /v1/models)",
                    param="model", code="model_not_found")  # fmt: skip


class _ErrorResponse(JSONResponse):
    def render(self, content) -> bytes:
        return _json_bytes(content)


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        return _ErrorResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException):
        return _ErrorResponse(error_body(str(e.detail), code=str(e.status_code)), status_code=e.status_code,
                              headers=getattr(e, "headers", None))  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError):
        return _ErrorResponse(error_body(str(e.errors()[:3])[:1000], code="invalid_request"), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception):
        log.exception("unhandled error")
        return _ErrorResponse(error_body(f"internal server error: {type(e).__name__}: {e}", "server_error"),
                              status_code=500)  # fmt: skip
