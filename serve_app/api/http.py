"""Turning a raw HTTP request into a validated request model, enforcing the configured limits."""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from serve_app.api import errors
from serve_app.config import LimitsConfig

M = TypeVar("M", bound=BaseModel)

# set by HAProxy on every request it forwards (``deployments/haproxy_shedding.py``): when it held the whole
# request, in microseconds since the epoch, by its node's clock (``deployments/ingress/arrival_clock.py``)
ARRIVED_HEADER = "X-Serve-Arrived-Us"
MAX_ARRIVAL_OFFSET_S = 60.0  # a stamp further off either way is not HAProxy's (a clock jump, or a forged header)


def arrival_offset_s(stamp: str | None, now_s: float) -> float | None:
    """Seconds from HAProxy's stamp (``ARRIVED_HEADER``) to ``now_s`` on this node's clock: the wait before the
    handler plus the two clocks' difference (below 0 where the stamping node's runs ahead). None without a
    stamp, for one that does not parse, and for one over ``MAX_ARRIVAL_OFFSET_S`` off."""
    if not stamp or not stamp.isdigit():
        return None
    offset = now_s - int(stamp) / 1e6
    return offset if abs(offset) <= MAX_ARRIVAL_OFFSET_S else None


async def read_body(request: Request, max_bytes: int) -> bytes:
    """Refuse by Content-Length first, and count while streaming for chunked bodies."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > max_bytes:
                raise errors.payload_too_large(f"request body exceeds {max_bytes} bytes")
        except ValueError:
            raise errors.ApiError(400, "invalid_request", "malformed Content-Length header") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise errors.payload_too_large(f"request body exceeds {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse(body: bytes, model: type[M]) -> M:
    if not body.strip():
        raise errors.invalid_json("empty body")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise errors.invalid_json(str(e)) from None
    except RecursionError:
        raise errors.invalid_json("nested too deeply") from None
    if not isinstance(data, dict):
        raise errors.ApiError(422, "validation_error", "body: expected a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise errors.from_validation(e) from None


def check_texts(texts: list[str], limits: LimitsConfig, max_count: int, what: str) -> None:
    if len(texts) > max_count:
        raise errors.ApiError(
            413, "too_many_inputs", f"{len(texts)} {what} exceed the limit of {max_count} per request"
        )
    for i, t in enumerate(texts):
        if len(t) > limits.max_text_chars:
            raise errors.ApiError(
                413, "text_too_long", f"{what}[{i}] has {len(t)} characters; the limit is {limits.max_text_chars}"
            )
        if not t.strip():
            raise errors.ApiError(422, "validation_error", f"{what}[{i}]: must not be empty or whitespace only")
