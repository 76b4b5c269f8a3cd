"""The homeserver's credentials on incoming requests: a bearer hs_token, constant-time checked."""

from __future__ import annotations

import hmac

from aiohttp import web

from bridge.appservice.errors import matrix_error


def check_hs_token(request: web.Request, hs_token: str) -> None:
    """Raise a Matrix-style 401 (no token) or 403 (wrong token); return when the token is right.

    Only the Authorization header is accepted: a token in the query string ends up in logs.
    """
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise matrix_error(401, "M_UNAUTHORIZED", "Missing bearer token in Authorization header")
    # aiohttp hands bytes that are not UTF-8 over as lone surrogates: back to those bytes (a
    # strict encode raised, a 500; found by tests/unit/test_fuzz_http.py).
    given = token.strip().encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given, hs_token.encode()):
        raise matrix_error(403, "M_FORBIDDEN", "Bad hs_token")
