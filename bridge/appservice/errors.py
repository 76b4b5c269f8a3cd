"""Matrix-style JSON errors (``errcode`` + ``error``) as aiohttp exceptions."""

from __future__ import annotations

import json

from aiohttp import web


class MatrixError(web.HTTPException):
    """An HTTP error whose body is ``{"errcode": ..., "error": ...}``, for any status."""

    def __init__(self, status: int, errcode: str, message: str) -> None:
        self.status_code = status
        super().__init__(
            text=json.dumps({"errcode": errcode, "error": message}),
            content_type="application/json",
        )


def matrix_error(status: int, errcode: str, message: str) -> web.HTTPException:
    return MatrixError(status, errcode, message)
