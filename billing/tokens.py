"""Access tokens: a recognisable prefix and 256 bits of randomness; only the SHA-256 is ever stored."""

from __future__ import annotations

import hashlib
import secrets

TOKEN_BYTES = 32


def new_token(prefix: str) -> str:
    """A fresh secret token, e.g. `hfi_Qm9...`; show it once."""
    return prefix + secrets.token_urlsafe(TOKEN_BYTES)


def token_sha256(token: str) -> str:
    """The stored form of a token. A plain hash is enough: the secret has 256 bits of entropy."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_hint(token: str, prefix: str) -> str:
    """What listings show of a token: its prefix and first four characters."""
    return token[: len(prefix) + 4] + "..."


def new_token_id() -> str:
    """A public handle for a token (for listing and revoking), not a secret."""
    return "tok_" + secrets.token_hex(8)
