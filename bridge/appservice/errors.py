"""Matrix-style JSON errors (``errcode`` + ``error``) as aiohttp exceptions."""

from __future__ import annotations

import json

from aiohttp import web


def matrix_error(status: int, errcode: str, message: str) -> web.HTTPException:
    body = json.dumps({"errcode": errcode, "error": message})
    cls = web.HTTPException
    for candidate in (web.HTTPBadRequest, web.HTTPUnauthorized, web.HTTPForbidden,
                      web.HTTPNotFound, web.HTTPRequestEntityTooLarge, web.HTTPServiceUnavailable,
                      web.HTTPInternalServerError):
        if candidate.status_code == status:
            cls = candidate
            break
    return cls(text=body, content_type="application/json")
