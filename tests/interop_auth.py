"""Authorize hook for the interop suite (``--authorize interop_auth:authorize``).

The same policy is built into ``node/reference-server.mjs`` for the Node reference server:

- token ``ro``: readonly session;
- token ``deny`` or ``deny-*``: connection refused;
- anything else (or no token): readwrite.
"""

from __future__ import annotations

from typing import Any


def _get(info: Any, key: str) -> Any:
    try:
        return info[key]
    except (KeyError, TypeError):
        return getattr(info, key, None)


def authorize(info: Any) -> dict[str, Any]:
    token = _get(info, "token") or ""
    if token == "deny" or token.startswith("deny-"):
        raise PermissionError("token refused")
    if token == "ro":
        return {"permissions": "readonly", "metadata": {"token": token}}
    return {"permissions": "readwrite", "metadata": {"token": token}}
