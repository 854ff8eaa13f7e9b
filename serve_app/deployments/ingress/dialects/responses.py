"""JSON answers as every dialect sends them: ``None`` fields left out, the truncation count in a header."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from starlette.responses import JSONResponse

from serve_app.api import schemas


def truncated_header(usage: schemas.Usage) -> dict[str, str]:
    """``X-Truncated-Inputs``: how many inputs were cut to the model's length (TEI's header)."""
    return {"X-Truncated-Inputs": str(usage.truncated_inputs)}


def json_response(model: BaseModel | list[Any], usage: schemas.Usage | None = None) -> JSONResponse:
    headers = truncated_header(usage) if usage is not None else None
    if isinstance(model, list):
        return JSONResponse([m.model_dump(exclude_none=True) for m in model], headers=headers)
    return JSONResponse(model.model_dump(exclude_none=True), headers=headers)
