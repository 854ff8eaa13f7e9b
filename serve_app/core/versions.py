"""A model version's identity, shared by every layer: the registry's key, the wire, the response header."""

from __future__ import annotations

from typing import NamedTuple


class ModelKey(NamedTuple):
    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}/{self.version}"  # as ``X-Model-Version`` and ``/v1/models`` show it
