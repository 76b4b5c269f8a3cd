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
    """One exclusive namespace for the bot and every connector's ghosts, present and future.

    Connector ids are part of the ghost localpart, so a connector added later is already covered
    and needs no new registration.
    """
    prefix = re.escape(config.appservice.user_prefix)
    domain = re.escape(config.homeserver.domain)
    # Anchored at the end: homeservers match namespaces from the start only, and a server whose
    # name merely begins with ours must not fall into our exclusive namespace.
    return f"@{prefix}.*:{domain}$"


def build_registration(config: Config) -> dict[str, Any]:
    a = config.appservice
    return {
        "id": a.id,
        "url": a.address,
        "as_token": secrets.token_urlsafe(48),
        "hs_token": secrets.token_urlsafe(48),
        "sender_localpart": a.bot_username,
        "namespaces": {
            "users": [{"exclusive": True, "regex": user_namespace_regex(config)}],
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
