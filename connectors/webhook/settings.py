"""The ``settings`` of a webhook connector: where the vendor is, and what it declared it can show.

A vendor declares its capabilities when it registers with the operator; they are checked here,
so a typo (``edtis: true``, a size of ``-1``, ``image/`` as a MIME type) stops the registration
with the key and the rule instead of surfacing later as odd deliveries.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from connectors.base import FILE_MSGTYPES, Capabilities, FileLimit, MessageKind

MAX_TEXT_LENGTH = 65536
"""Longest text the contract carries (``Text.maxLength`` in openapi.yaml)."""
MAX_FILE_SIZE = 1 << 40
MAX_MENTIONS = 50
"""Most mentions the contract carries in one message (``Mentions.maxItems`` in openapi.yaml)."""
MIN_SECRET_LENGTH = 32

_MIME_PATTERN = re.compile(
    r"(\*/\*|[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/(\*|[a-z0-9][a-z0-9!#$&^_.+-]{0,126}))"
)


class FileLimitSettings(BaseModel):
    """What the vendor accepts for one kind of file."""

    model_config = ConfigDict(extra="forbid")

    max_size: int = Field(gt=0, le=MAX_FILE_SIZE, description="In bytes")
    mime_types: list[str] = Field(default_factory=lambda: ["*/*"], min_length=1)

    @field_validator("mime_types")
    @classmethod
    def _mime_types(cls, value: list[str]) -> list[str]:
        for mime in value:
            if not _MIME_PATTERN.fullmatch(mime):
                raise ValueError(
                    f"{mime[:60]!r} is not a MIME type: write 'type/subtype', 'type/*' or '*/*' "
                    "in lower case"
                )
        return value


class CapabilitiesSettings(BaseModel):
    """``connectors.base.Capabilities`` as a vendor writes it; off unless declared."""

    model_config = ConfigDict(extra="forbid")

    formatting: Literal["plain", "markdown"] = "plain"
    max_text_length: int = Field(4000, ge=1, le=MAX_TEXT_LENGTH)
    long_text: Literal["split", "refuse"] = "split"
    message_kinds: list[MessageKind] = Field(default_factory=lambda: ["text"])
    files: dict[str, FileLimitSettings] = Field(default_factory=dict)
    locations: bool = False
    mentions: bool = False
    max_mentions: int = Field(
        MAX_MENTIONS, ge=1, le=MAX_MENTIONS, description="Most people one message mentions"
    )
    replies: bool = False
    edits: bool = False
    deletions: bool = False
    reactions: bool = False
    read_receipts: bool = False
    typing: bool = False
    delivery_status: bool = False
    add_participants: bool = False
    """People can be added to an open conversation (and people from outside leave it)."""
    remove_participants: bool = False
    """The vendor's own users can be removed by someone else."""
    titles: bool = False
    topics: bool = False
    history: bool = False
    """``GET /conversations/{cid}/messages`` serves a conversation's earlier messages."""
    system_messages: bool = False
    """``POST /conversations/{cid}/system`` shows the bridge's notes as system messages."""

    @field_validator("message_kinds")
    @classmethod
    def _kinds(cls, value: list[MessageKind]) -> list[MessageKind]:
        if "text" not in value:
            raise ValueError("must include 'text' (every vendor shows plain messages)")
        return value

    @field_validator("files")
    @classmethod
    def _file_kinds(cls, value: dict[str, FileLimitSettings]) -> dict[str, FileLimitSettings]:
        for msgtype in value:
            if msgtype not in FILE_MSGTYPES:
                raise ValueError(
                    f"{msgtype[:40]!r} is not a kind of file; use {', '.join(FILE_MSGTYPES)}"
                )
        return value

    def to_capabilities(self) -> Capabilities:
        """The same fields, in the connector interface's types."""
        return Capabilities(
            **self.model_dump(exclude={"message_kinds", "files"}),
            message_kinds=frozenset(self.message_kinds),
            files={
                msgtype: FileLimit(limit.max_size, frozenset(limit.mime_types))
                for msgtype, limit in self.files.items()
            },
        )


class WebhookSettings(BaseModel):
    """The ``settings`` block of a webhook connector.

    The shared secret normally lives with the bridge (``connector add`` shows it once, stores it
    sealed, ``connector rotate-secret`` rotates it); ``secret`` is for instances declared in the
    config file, used only when the bridge holds none.
    """

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(
        description="The vendor's API root, e.g. https://api.vendor.example/eimis"
    )
    secret: SecretStr | None = None
    capabilities: CapabilitiesSettings = Field(default_factory=CapabilitiesSettings)
    timeout_s: float = Field(15.0, gt=0, le=300)
    typing_timeout_s: float = Field(5.0, gt=0, le=60)
    replay_window_s: int = Field(300, ge=30, le=3600)
    max_body_bytes: int = Field(1024 * 1024, ge=64 * 1024, le=16 * 1024 * 1024)
    max_events_per_request: int = Field(100, ge=1, le=100)
    rate_limit_per_s: float = Field(50.0, gt=0, description="Requests per second from the vendor")
    rate_limit_burst: int = Field(200, ge=1)
    announce: bool = Field(True, description="Tell the vendor the events URL at start")

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", value):
            raise ValueError("must be an absolute http:// or https:// URL without query")
        return value.rstrip("/")

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_SECRET_LENGTH:
            raise ValueError(
                f"must be at least {MIN_SECRET_LENGTH} characters (e.g. openssl rand -hex 32)"
            )
        return value

    @field_validator("capabilities", mode="before")
    @classmethod
    def _capabilities_json(cls, value: Any) -> Any:
        """``--set capabilities='{"edits": true, ...}'`` arrives as a string: read it as JSON."""
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError("is not a JSON object") from None
        return value
