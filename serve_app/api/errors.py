"""Client-facing errors: one JSON shape and the right status for each cause.

The body is TEI's ``{error, error_type}`` with the same text under ``message`` (read by the Cohere and
OpenAI clients) and ``detail`` (read by Jina's), so every client shows the reason instead of failing
to parse the error.
"""

from __future__ import annotations

from pydantic import ValidationError
from starlette.responses import JSONResponse


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        error_type: str,
        message: str,
        retry_after_s: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.headers = dict(headers or {})
        if retry_after_s is not None:
            self.headers["Retry-After"] = str(retry_after_s)

    def response(self) -> JSONResponse:
        return JSONResponse(body(self.message, self.error_type), status_code=self.status, headers=self.headers or None)


def body(message: str, error_type: str) -> dict[str, str]:
    return {"error": message, "error_type": error_type, "message": message, "detail": message}


def invalid_json(detail: str) -> ApiError:
    return ApiError(400, "invalid_json", f"request body is not valid JSON: {detail}")


def from_validation(err: ValidationError) -> ApiError:
    """Summarise pydantic's errors as ``field: reason; ...`` (the first five are enough to fix a client)."""
    parts = []
    for e in err.errors()[:5]:
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")  # our own validators' messages name what is wrong
        parts.append(f"{loc}: {msg}" if loc else msg if e["type"] == "value_error" else f"body: {msg}")
    return ApiError(422, "validation_error", "; ".join(parts))


def payload_too_large(what: str) -> ApiError:
    return ApiError(413, "payload_too_large", what)


# on every refusal for overload, naming who refused: ``ingress`` (its admission control, or a model's full queue)
# or ``haproxy`` (``deployments/haproxy_shedding.py``, which counts the ingress's refusals by this header)
OVERLOADED_HEADER = "X-Overloaded"
OVERLOADED_MESSAGE = "the service is at capacity; retry later"
STARTED_LATE_MESSAGE = "the service is at capacity: the request could not start in time; retry later"


def overloaded(retry_after_s: int = 1, started_late: bool = False) -> ApiError:
    """A refusal for overload: at the door, or (``started_late``) an admitted request that did not start in time."""
    message = STARTED_LATE_MESSAGE if started_late else OVERLOADED_MESSAGE
    return ApiError(503, "overloaded", message, retry_after_s, headers={OVERLOADED_HEADER: "ingress"})


def unavailable(detail: str, retry_after_s: int = 2) -> ApiError:
    return ApiError(503, "unavailable", detail, retry_after_s)


def unauthorized(detail: str) -> ApiError:
    return ApiError(401, "unauthorized", detail, headers={"WWW-Authenticate": 'Bearer realm="serve-app"'})


def deadline_exceeded(timeout_s: float) -> ApiError:
    return ApiError(504, "deadline_exceeded", f"no answer within the request's deadline of {timeout_s * 1000:.0f} ms")
