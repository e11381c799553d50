"""Request body -> `ChatCompletionRequest`, strictly: every refusal is an `APIError` 400 naming the field.

The body is parsed by pydantic's own JSON parser (jiter), which refuses what Python's `json` lets through to
fail later: nesting deeper than 200, integer literals above 4,300 digits, lone UTF-16 surrogates, invalid
UTF-8, NaN and Infinity. Every field is then checked against its real range (schemas.py), and the text of
the messages against a character cap, before anything is tokenized.
"""

from __future__ import annotations

from pydantic import ValidationError

from .schemas import APIError, ChatCompletionRequest

UNION_BRANCHES = ("str", "list", "int")  # pydantic's names for the branches of `str | list[...]`


def parse_request(body: bytes, max_chars: int) -> ChatCompletionRequest:
    try:
        req = ChatCompletionRequest.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            reason = (first.get("ctx") or {}).get("error", first["msg"])
            if "escape" in reason:
                reason += " (a \\u escape has 4 hex digits, and one in D800-DFFF is half of a surrogate pair)"
            raise APIError(400, f"the request body is not valid JSON: {reason}", code="invalid_json") from None
        if first["type"] == "model_type" and not first["loc"]:
            raise APIError(400, "the request body must be a JSON object", code="invalid_request") from None
        message, param = describe(e)
        raise APIError(400, message, param=param, code="invalid_request") from None
    if (error := req.unsupported()) is not None:
        raise error
    n = req.characters()
    if n > max_chars:
        raise APIError(413, f"the messages have {n} characters of text, above this server's limit of {max_chars} "
                            "(ServeSettings.max_prompt_chars); shorten them", param="messages",
                       code="prompt_too_large")  # fmt: skip
    return req


def describe(e: ValidationError) -> tuple[str, str | None]:
    """`messages[0].content: Input should be ...` for the first few errors, and the first error's field."""
    lines, first = [], None
    for err in e.errors()[:3]:
        loc = ""
        for part in err["loc"]:
            if isinstance(part, int):
                loc += f"[{part}]"
            elif not any(c in part for c in "[(-") and part not in UNION_BRANCHES:
                loc += f".{part}" if loc else part
        first = first or loc or None
        msg = err["msg"] if len(err["msg"]) <= 300 else err["msg"][:300] + "..."  # it may quote the input
        lines.append(f"{loc or 'body'}: {msg}{_got(err.get('input'))}")
    more = len(e.errors()) - 3
    return "; ".join(lines) + (f" (and {more} more)" if more > 0 else ""), first


def _got(value) -> str:
    """`, got 1e+30` for a short scalar input; nothing for long ones (an int of 4,000 digits stays unprinted)."""
    if isinstance(value, bool) or value is None or not isinstance(value, (int, float, str)):
        return ""
    if isinstance(value, int) and value.bit_length() > 128:
        return ""
    shown = repr(value) if not isinstance(value, str) or len(value) <= 40 else ""
    return f", got {shown}" if shown else ""
