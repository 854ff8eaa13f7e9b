"""Bearer API keys at the ingress: which requests need one, and a constant-time check of what was sent.

The ingress holds SHA-256 digests only (``AuthConfig``). A sent token is hashed and compared with every
digest through ``hmac.compare_digest``, all of them each time, so neither the timing nor an early exit
tells a caller how close a guess came or which key matched. Nothing here logs a header.
"""

from __future__ import annotations

import hashlib
import hmac

from serve_app.api import errors


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (the scheme is case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class ApiKeys:
    def __init__(self, digests: tuple[str, ...] = ()) -> None:
        self._digests = [bytes.fromhex(d.removeprefix("sha256:")) for d in digests]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def allows(self, authorization: str | None) -> bool:
        token = bearer_token(authorization)
        if token is None:
            return False
        sent = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(sent, digest)
        return matched

    def check(self, authorization: str | None) -> None:
        """Raise 401 unless keys are off or the header carries one of them."""
        if not self._digests:
            return
        if authorization is None:
            raise errors.unauthorized("an API key is required: send Authorization: Bearer <key>")
        if not self.allows(authorization):
            raise errors.unauthorized("invalid API key")
