"""Is open registration on? Asked at start when ghosts are in a non-exclusive namespace.

With ``appservice.ghosts_in_user_directory`` the registration claims the ghosts' prefix
non-exclusively (so the homeserver's user directory lists them), and the homeserver no longer
refuses someone registering an ``@<prefix>...`` account themselves. EIMIS homeservers create
accounts through Pro Santé Connect only, so open registration must stay off: the bridge asks
(``POST /_matrix/client/v3/register`` with ``{}``, unauthenticated: a 401 with ``flows`` means
registration is open, 403 ``M_FORBIDDEN`` closed) and logs a WARNING naming the risk when it is
open. A probe that fails is logged at DEBUG and never fails the start.
"""

from __future__ import annotations

import logging

from aiohttp import ClientSession, ClientTimeout

log = logging.getLogger("eimis.homeserver")

PROBE_TIMEOUT_S = 10.0


async def registration_is_open(session: ClientSession, homeserver_url: str) -> bool | None:
    """True: anyone may register an account; False: closed; None: the answer says neither."""
    url = f"{homeserver_url.rstrip('/')}/_matrix/client/v3/register"
    async with session.post(url, json={}, timeout=ClientTimeout(total=PROBE_TIMEOUT_S)) as resp:
        try:
            body = await resp.json(content_type=None)
        except ValueError:
            body = None
    if not isinstance(body, dict):
        return None
    if resp.status == 401 and isinstance(body.get("flows"), list):
        return True
    if resp.status == 403 and body.get("errcode") == "M_FORBIDDEN":
        return False
    return None


async def warn_if_open_registration(
    session: ClientSession, homeserver_url: str, user_prefix: str
) -> bool | None:
    """Log a WARNING when the homeserver lets anyone register; never raises."""
    try:
        found = await registration_is_open(session, homeserver_url)
    except Exception as error:  # a probe never fails the start
        log.debug(
            "Could not ask the homeserver whether registration is open (%s)",
            type(error).__name__,
        )
        return None
    if found:
        log.warning(
            "The homeserver allows open registration while the ghosts' namespace (@%s...) is "
            "non-exclusive (appservice.ghosts_in_user_directory): anyone could register an "
            "account that looks like a professional's ghost. Turn open registration off "
            "(accounts through Pro Santé Connect only), or set ghosts_in_user_directory: false.",
            user_prefix,
        )
    return found
