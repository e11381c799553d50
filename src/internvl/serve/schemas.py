"""The OpenAI Chat Completions shape: request models, reply/chunk builders and the error body."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..engine.sampling import SamplingParams, sampling_params
from ..errors import InternVLError

MAX_TILES_PER_IMAGE = 40  # the largest max_dynamic_patch a request may ask for (InternVL uses 6 to 40)
DETAIL_TILES = {"low": 6, "medium": 12, "high": 24}  # lmdeploy's mapping of `detail` to a tile cap
# Each field's real range, so that nothing out of it reaches the engine: torch seeds are 64-bit (either
# sign); below these temperature / top_p / repetition penalty floors float32 sampling gives inf or NaN.
SEED_RANGE = (-(2**63), 2**64 - 1)
MIN_TEMPERATURE, MIN_TOP_P, PENALTY_RANGE = 1e-5, 1e-6, (1e-2, 1e2)
MAX_COUNT = 2**31 - 1  # token counts and top_k
MAX_MESSAGES, MAX_PARTS, MAX_STOPS, MAX_STOP_CHARS = 4096, 256, 16, 1024


class APIError(Exception):
    """An error answered as `{"error": {message, type, param, code}}` with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:  # fmt: skip
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---- requests -----------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class ImageURL(_Model):
    url: str
    detail: Literal["auto", "low", "medium", "high"] | None = None
    max_dynamic_patch: int | None = Field(None, ge=1, le=MAX_TILES_PER_IMAGE)

    def max_tiles(self) -> int | None:
        """The tile cap for this image: `max_dynamic_patch`, else the `detail` level, else the model default."""
        if self.max_dynamic_patch is not None:
            return self.max_dynamic_patch
        return DETAIL_TILES.get(self.detail or "auto")


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_PARTS)] | None = None

    def characters(self) -> int:
        if isinstance(self.content, str):
            return len(self.content)
        return sum(len(p.text) for p in self.content or () if isinstance(p, TextPart))


class StreamOptions(_Model):
    include_usage: bool = False


class ChatCompletionRequest(_Model):
    """Unknown fields are accepted and ignored, as OpenAI clients send many optional ones."""

    model: str | None = None
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_COUNT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_COUNT)
    min_tokens: int | None = Field(None, ge=0, le=MAX_COUNT)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=MIN_TOP_P, le=1)
    top_k: int | None = Field(None, ge=-1, le=MAX_COUNT)  # -1 or 0: no top-k (vLLM uses -1)
    repetition_penalty: float | None = Field(None, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    n: int = Field(1, ge=-MAX_COUNT, le=MAX_COUNT)
    logprobs: bool | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    tools: list[Any] | None = None

    def unsupported(self) -> APIError | None:
        """The first option we cannot honour, as a 400 (silently ignoring it would mislead the client)."""
        if self.temperature is not None and 0 < self.temperature < MIN_TEMPERATURE:
            return APIError(400, f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got "
                                 f"{self.temperature:g}", param="temperature")  # fmt: skip
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            return APIError(400, f"a stop string may have at most {MAX_STOP_CHARS} characters", param="stop")
        if self.n != 1:
            return APIError(
                400, f"n must be 1 (got {self.n}); send separate requests for several answers", param="n"
            )
        if self.logprobs:
            return APIError(400, "logprobs are not supported by this server", param="logprobs")
        if self.tools:
            return APIError(400, "tools / function calling are not supported by this server", param="tools")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return APIError(
                    400, f"{name} is not supported; use repetition_penalty (extra_body)", param=name
                )
        return None

    def characters(self) -> int:
        """Characters of text in all the messages (image URLs not counted)."""
        return sum(m.characters() for m in self.messages)

    def sampling(self, defaults: SamplingParams, max_new_tokens: int) -> SamplingParams:
        """The validated generation fields as `SamplingParams` over the model's `defaults` (unset fields keep
        them); a combination the sampler refuses is a 400 `invalid_sampling`."""
        try:
            return sampling_params(
                defaults, max_new_tokens=max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                top_k=None if self.top_k is None else max(0, self.top_k), repetition_penalty=self.repetition_penalty,
                seed=self.seed, stop=self.stop, min_new_tokens=self.min_tokens,
            )  # fmt: skip
        except InternVLError as e:
            raise APIError(400, str(e), code="invalid_sampling") from None


# ---- replies ------------------------------------------------------------------------------------


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def completion(id: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int) -> dict[str, Any]:  # fmt: skip
    return {
        "id": id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }  # fmt: skip


def chunk(id: str, model: str, created: int, delta: dict[str, Any] | None = None, finish_reason: str | None = None,
          usage_: dict[str, int] | None = None, with_usage: bool = False) -> dict[str, Any]:  # fmt: skip
    """One `chat.completion.chunk`; `delta=None` is the usage-only chunk (empty choices)."""
    body: dict[str, Any] = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model}
    body["choices"] = [] if delta is None else [
        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    ]  # fmt: skip
    if with_usage:
        body["usage"] = usage_
    return body


def model_card(name: str, max_model_len: int, created: int) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "internvl",
        "max_model_len": max_model_len,
    }


def openapi(app) -> dict[str, Any]:
    """FastAPI's OpenAPI document with the chat request's schema filled in (the route reads the raw body, so
    FastAPI cannot see it); clients and API fuzzers read it from /openapi.json."""
    from fastapi.openapi.utils import get_openapi

    spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schema = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    components.update(schema.pop("$defs", {}), ChatCompletionRequest=schema)
    spec["paths"]["/v1/chat/completions"]["post"]["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}},
    }
    app.openapi_schema = spec
    return spec
