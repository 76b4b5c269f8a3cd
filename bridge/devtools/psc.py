"""A small stand-in for Pro Santé Connect (the health professionals' identity provider) in tests.

``POST /token`` with ``{"idnps": "...", "email": "..."?}`` answers
``{"access_token": "<RS256 JWT>", "token_type": "Bearer", "expires_in": N}``. The JWT carries
``iss``, ``aud``, ``azp``, ``sub`` (the IDNPS), ``email`` (the mailbox address of that identity,
from the user table the mail system shares), ``iat``, ``nbf``, ``exp`` and ``kid`` in its header.
An identity the table does not know (or an address it does not own) is a 404 JSON error, a body
that is not such an object a 400.

The public key is written where Dovecot's ``oauth2`` passdb validates tokens locally
(``local_validation_key_dict = fs:posix:prefix=<key_dir>/``): Dovecot 2.3 looks the key up as
``<azp>/<alg>/<kid>`` under that prefix (``oauth2-jwt.c``; '.', '/' and '%' in ``kid`` are
%-escaped there, so the ids chosen here use none of them), the file holding a PEM public key.

No HTTPS: the server listens on loopback only and the tokens are worthless anywhere else.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bridge.devtools.ports import free_port

__all__ = ["DEFAULT_LIFETIME", "ProSanteConnectStandIn"]

DEFAULT_LIFETIME = 300
ALGORITHM = "RS256"
_MAX_BODY = 4096


class ProSanteConnectStandIn:
    """Issue short-lived RS256 tokens for the identities ``users()`` lists.

    ``users`` returns (idnps, address) pairs, read at every request so identities added later
    get tokens too. ``key_dir`` is Dovecot's key dictionary root (the public key goes in
    ``key_dir/azp/RS256/kid``).
    """

    def __init__(
        self,
        key_dir: Path,
        users: Callable[[], Sequence[tuple[str, str]]],
        *,
        issuer: str = "https://psc.localhost/auth/realms/esante-wallet",
        audience: str = "eimis-mail",
        azp: str = "eimis-bridge",
        kid: str = "psc-test-1",
        lifetime: int = DEFAULT_LIFETIME,
        host: str = "127.0.0.1",
        port: int | None = None,
    ) -> None:
        for name, value in (("azp", azp), ("kid", kid)):
            if not value or any(c in value for c in "./%"):
                raise ValueError(f"{name} must be non-empty without '.', '/' or '%'")
        self.key_dir = Path(key_dir)
        self.issuer = issuer
        self.audience = audience
        self.azp = azp
        self.kid = kid
        self.lifetime = lifetime
        self.host = host
        self.port = port or free_port(host)
        self._users = users
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._runner: web.AppRunner | None = None
        self.public_key_file = self.key_dir / azp / ALGORITHM / kid

    @property
    def token_url(self) -> str:
        return f"http://{self.host}:{self.port}/token"

    @property
    def public_key_pem(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def write_public_key(self) -> Path:
        """Write the PEM public key where Dovecot looks it up (readable by its auth process)."""
        self.public_key_file.parent.mkdir(parents=True, exist_ok=True)
        for directory in (self.key_dir, self.key_dir / self.azp, self.public_key_file.parent):
            directory.chmod(0o755)
        self.public_key_file.write_bytes(self.public_key_pem)
        self.public_key_file.chmod(0o644)
        return self.public_key_file

    def address_of(self, idnps: str, email: str | None = None) -> str | None:
        """The mailbox address a token for ``idnps`` names (``email`` if that identity owns it)."""
        owned = [address for who, address in self._users() if who == idnps]
        if email is None:
            return owned[0] if owned else None
        wanted = email.strip().lower()
        return next((a for a in owned if a.lower() == wanted), None)

    def mint(
        self,
        idnps: str,
        email: str,
        *,
        lifetime: int | None = None,
        now: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """A signed token (no user-table check: tests use it to make odd tokens too)."""
        issued = int(time.time() if now is None else now)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "azp": self.azp,
            "sub": idnps,
            "email": email,
            "iat": issued,
            "nbf": issued,
            "exp": issued + (self.lifetime if lifetime is None else lifetime),
            "jti": secrets.token_hex(8),
            "scope": "openid scope_all",
        }
        claims.update(extra or {})
        return jwt.encode(claims, self._key, algorithm=ALGORITHM, headers={"kid": self.kid})

    async def start(self) -> None:
        self.write_public_key()
        app = web.Application(client_max_size=_MAX_BODY)
        app.router.add_post("/token", self._token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _token(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except (ValueError, web.HTTPRequestEntityTooLarge):
            return _error(400, "invalid_request", "the body is not a JSON object")
        if not isinstance(body, dict):
            return _error(400, "invalid_request", "the body is not a JSON object")
        idnps, email = body.get("idnps"), body.get("email")
        if not isinstance(idnps, str) or not idnps.strip():
            return _error(400, "invalid_request", "idnps (a non-empty string) is required")
        if email is not None and not isinstance(email, str):
            return _error(400, "invalid_request", "email must be a string")
        address = self.address_of(idnps, email)
        if address is None:
            return _error(404, "unknown_identity", "no mailbox for this identity")
        token = self.mint(idnps, address)
        return web.json_response(
            {"access_token": token, "token_type": "Bearer", "expires_in": self.lifetime}
        )


def _error(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)
