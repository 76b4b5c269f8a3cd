"""HTTP plumbing shared by the sandboxes: JSON bodies checked by pydantic, errors always as JSON."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware
from pydantic import BaseModel, ConfigDict, ValidationError

from connectors.kit.tasks import cancel_and_wait
from connectors.sandbox.kernel import (
    DEFAULT_USER_PAGE,
    MAX_USER_PAGE,
    Kernel,
    SandboxError,
    SandboxUser,
    bad_request,
)

log = logging.getLogger("eimis.sandbox")

MAX_BODY_BYTES = 1024 * 1024
"""Largest request body; more is refused with 413 (message texts have their own 64 KiB limit)."""

USER_API_PREFIX = "/_sandbox/"

KERNEL_KEY = web.AppKey("sandbox_kernel", Kernel)
"""Where a sandbox app keeps its kernel (for tools and tests that look inside)."""

ErrorFormatter = Callable[[SandboxError], dict[str, Any]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

M = TypeVar("M", bound=BaseModel)


class Body(BaseModel):
    """Base of request bodies: strict types (no "1" for 1), unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


def iso8601(moment: datetime) -> str:
    """ISO-8601 with milliseconds and the UTC offset, e.g. ``2025-01-31T08:00:00.000+00:00``."""
    return moment.isoformat(timespec="milliseconds")


def epoch_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def user_api_error(error: SandboxError) -> dict[str, Any]:
    """The error body of the user-side API (the same in every sandbox)."""
    return {"error": error.code, "message": error.message}


async def read_limited(request: web.Request, max_bytes: int) -> bytes:
    """The whole request body, refused with 413 as soon as it goes over ``max_bytes``."""
    too_large = SandboxError(
        413, "body_too_large", f"The request body is larger than {max_bytes} bytes."
    )
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise too_large
    buffer = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        buffer += chunk
        if len(buffer) > max_bytes:
            raise too_large
    return bytes(buffer)


async def read_body(request: web.Request, model: type[M], max_bytes: int = MAX_BODY_BYTES) -> M:
    """The request's JSON object validated as ``model``, or a 400/413 with a sentence."""
    raw = await read_limited(request, max_bytes)
    if not raw.strip():
        raise bad_request("The request body is empty; a JSON object is expected.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("The request body is not valid UTF-8.") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise bad_request("The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(
            "The request body holds a string that is not valid Unicode (a lone surrogate)."
        ) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise bad_request(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    """One sentence for the first problem pydantic found, naming the field."""
    first = exc.errors(include_url=False, include_input=False)[0]
    path = ""
    for part in first["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    if first["type"] == "missing":
        return f"The field '{path}' is required."
    return f"The field '{path}' is invalid: {first['msg']}." if path else f"{first['msg']}."


def error_response(error: SandboxError, formatter: ErrorFormatter) -> web.Response:
    response = web.json_response(formatter(error), status=error.status)
    response.headers.update(error.headers)
    return response


_HTTP_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    416: "range_not_satisfiable",
}


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> SandboxError:
    if exc.status == 404:
        sentence = f"There is no endpoint {request.path[:100]!r}."
    elif exc.status == 405:
        sentence = f"The method {request.method} is not allowed on {request.path[:100]!r}."
    elif exc.status == 413:
        sentence = f"The request body is larger than {MAX_BODY_BYTES} bytes."
    else:
        sentence = f"The request was refused: {exc.reason}."
    error = SandboxError(exc.status, _HTTP_CODES.get(exc.status, "error"), sentence)
    if "Allow" in exc.headers:
        error.headers["Allow"] = exc.headers["Allow"]
    return error


def error_middleware(vendor_error: ErrorFormatter) -> Middleware:
    """Turn every refusal into a JSON error: the vendor's format, or the user-side API's one."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        user_side = request.path.startswith(USER_API_PREFIX)
        formatter = user_api_error if user_side else vendor_error
        try:
            return await handler(request)
        except SandboxError as error:
            return error_response(error, formatter)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_response(_from_http_exception(request, exc), formatter)
        except Exception:
            log.exception("sandbox: unexpected error on %s %s", request.method, request.path)
            failure = SandboxError(500, "internal_error", "The sandbox failed unexpectedly.")
            return error_response(failure, formatter)

    return middleware


def background_delivery(
    run: Callable[[aiohttp.ClientSession], Awaitable[None]], *, name: str, timeout: float
) -> Callable[[web.Application], AsyncIterator[None]]:
    """An app cleanup context that runs ``run`` (a sandbox pushing events to the bridge) as a task
    for the app's lifetime, on its own HTTP session whose requests give up after ``timeout``
    seconds; the task is cancelled when the app shuts down."""

    async def delivery(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            task = asyncio.create_task(run(session), name=name)
            yield
            await cancel_and_wait(task)

    return delivery


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    """The integer query parameter ``name`` (``default`` when absent), 400 outside
    [``low``, ``high``] or when not a plain non-negative integer."""
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise bad_request(f"The query parameter '{name}' must be a non-negative integer.")
    value = int(raw)
    if not low <= value <= high:
        raise bad_request(f"The query parameter '{name}' must be between {low} and {high}.")
    return value


def query_user_page(
    request: web.Request, kernel: Kernel, cursor: str
) -> tuple[list[SandboxUser], str | None]:
    """A page of the user listing as the query asks it: ``limit`` (1 .. 1000, default 100) users
    after the IDNPS in query parameter ``cursor`` (each vendor names it), and the next cursor
    (None on the last page). 400 for a bad limit or cursor."""
    limit = query_int(request, "limit", DEFAULT_USER_PAGE, 1, MAX_USER_PAGE)
    return kernel.users_after(request.query.get(cursor), limit)


def query_time(request: web.Request, name: str) -> datetime | None:
    """The ISO-8601 moment in query parameter ``name`` (with a UTC offset; none means UTC), None
    when absent, 400 when unreadable."""
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        if len(raw) > 64:
            raise ValueError
        # A "+" left unencoded in a query string arrives as a space.
        moment = datetime.fromisoformat(raw.replace(" ", "+").replace("z", "Z"))
    except ValueError:
        raise bad_request(
            f"The query parameter '{name}' must be an ISO-8601 date and time, "
            "e.g. 2025-01-31T08:00:00Z."
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
