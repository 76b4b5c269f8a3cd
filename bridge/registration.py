"""The appservice registration file the homeserver reads (generate-registration)."""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Any

import yaml

from bridge.config import Config
from bridge.private_files import write_private


def user_namespace_regex(config: Config) -> str:
    """The namespace of the bot and every connector's ghosts, present and future.

    Connector ids are part of the ghost localpart, so a connector added later is already covered
    and needs no new registration.
    """
    prefix = re.escape(config.appservice.user_prefix)
    domain = re.escape(config.homeserver.domain)
    # Anchored at the end: homeservers match namespaces from the start only, and a server whose
    # name merely begins with ours must not fall into our exclusive namespace.
    return f"@{prefix}.*:{domain}$"


def bot_namespace_regex(config: Config) -> str:
    """The bot's own Matrix ID, and nothing else."""
    return f"^{re.escape(config.bot_mxid)}$"


def user_namespaces(config: Config) -> list[dict[str, Any]]:
    """The users the appservice claims.

    ``appservice.ghosts_in_user_directory`` (default): the bot exclusively, the ghost prefix
    NON-exclusively. Synapse leaves the users of an appservice's exclusive namespaces out of its
    user directory, so only a non-exclusive namespace lets a native user find a professional's
    ghost from their client's user search. The price: the homeserver no longer refuses someone
    registering an ``@<prefix>...`` account themselves, so open registration must stay off (EIMIS
    homeservers create accounts through Pro Santé Connect only; the bridge warns at start when
    the homeserver allows open registration). Off: one exclusive namespace for everything.
    """
    ghosts = user_namespace_regex(config)
    if not config.appservice.ghosts_in_user_directory:
        return [{"exclusive": True, "regex": ghosts}]
    return [
        {"exclusive": True, "regex": bot_namespace_regex(config)},
        {"exclusive": False, "regex": ghosts},
    ]


def build_registration(config: Config) -> dict[str, Any]:
    a = config.appservice
    return {
        "id": a.id,
        "url": a.address,
        "as_token": secrets.token_urlsafe(48),
        "hs_token": secrets.token_urlsafe(48),
        "sender_localpart": a.bot_username,
        "namespaces": {
            "users": user_namespaces(config),
            "aliases": [],
            "rooms": [],
        },
        "rate_limited": False,
        # Third-party lookups (``bridge/appservice/thirdparty.py``): clients find professionals
        # by name or identifier through the homeserver's /thirdparty/user/eimis.
        "protocols": ["eimis"],
        "receive_ephemeral": True,
        "de.sorunome.msc2409.push_ephemeral": True,
        # End-to-end encryption: device lists and one-time key counts in transactions (MSC3202),
        # and devices created for ghosts through the device API instead of /login (MSC4190).
        "org.matrix.msc3202": True,
        "io.element.msc4190": True,
    }


def write_registration(config: Config, path: Path) -> dict[str, Any]:
    registration = build_registration(config)
    # The file holds both tokens: readable by its owner only.
    write_private(path, yaml.safe_dump(registration, sort_keys=False))
    return registration
