"""The bridge's configuration: one YAML file, typed and validated at start.

Any string value may be written ``${NAME}`` to take it from the environment variable NAME (for
secrets); an unset variable is an error that names the key. Validation errors name the key and
say what is wrong, e.g. ``connectors.pandalab.settings.api_url: Field required``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

_ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
CONNECTOR_ID = re.compile(r"^[a-z][a-z0-9]{0,31}$")
RESERVED_CONNECTOR_IDS = frozenset({"bot", "matrix"})


class ConfigError(Exception):
    """The configuration file cannot be used; the message says which key and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HomeserverConfig(_Strict):
    url: str = Field(description="Client-server API base URL the bridge calls")
    domain: str = Field(description="The homeserver's server name (the part after ':' in ids)")
    verify_ssl: bool = True
    startup_timeout_s: float = Field(60.0, gt=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


class AppserviceConfig(_Strict):
    id: str = "eimis-bridge"
    address: str = Field(description="URL at which the homeserver reaches this bridge")
    hostname: str = "127.0.0.1"
    port: int = Field(29340, ge=1, le=65535)
    public_url: str | None = Field(
        None, description="URL at which vendors reach the connectors' webhooks (default: address)"
    )
    registration: Path | None = Field(
        None, description="Registration file to read the tokens from (generate-registration)"
    )
    as_token: str | None = None
    hs_token: str | None = None
    user_prefix: str = "eimis_"
    bot_localpart: str | None = None
    bot_displayname: str = "EIMIS bridge"
    max_body_bytes: int = Field(16 * 1024 * 1024, gt=0)
    ghosts_in_user_directory: bool = Field(
        True,
        description="Ghosts in a non-exclusive namespace, so the homeserver's user directory "
        "lists them (found from any client's user search); keep open registration off",
    )

    @field_validator("address", "public_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/") if value else value

    @field_validator("user_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9._=/-]+_", value):
            raise ValueError("must be lower-case Matrix localpart characters ending with '_'")
        return value

    @model_validator(mode="after")
    def _tokens(self) -> AppserviceConfig:
        if self.registration is None and not (self.as_token and self.hs_token):
            raise ValueError(
                "set 'registration' (the file generate-registration wrote) or both 'as_token' "
                "and 'hs_token'"
            )
        return self

    @property
    def bot_username(self) -> str:
        return self.bot_localpart or f"{self.user_prefix}bot"

    @property
    def webhook_base_url(self) -> str:
        return self.public_url or self.address


class DatabaseConfig(_Strict):
    url: str = Field("sqlite:eimis-bridge.db", description="sqlite:PATH or postgresql://...")
    min_size: int = Field(1, ge=1)
    max_size: int = Field(10, ge=1)
    wal_truncate_interval_s: float = Field(
        60.0,
        ge=0,
        description="SQLite: how often the write-ahead log is checkpointed and emptied, so the "
        "content of delivered messages does not stay in it (0: never)",
    )

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not value.startswith(("sqlite:", "postgres://", "postgresql://")):
            raise ValueError("must start with sqlite: or postgresql://")
        return value

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite:")


class ConnectorConfig(_Strict):
    type: str
    enabled: bool = True
    settings: dict[str, Any] = Field(default_factory=dict)


class MediaConfig(_Strict):
    max_file_size: int = Field(100 * 1024 * 1024, gt=0, description="Largest file bridged, bytes")
    allowed_mime_types: tuple[str, ...] = Field(
        (
            "image/*",
            "audio/*",
            "video/*",
            "application/pdf",
            "application/dicom",
            "text/plain",
            "text/csv",
            "application/msword",
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
            "application/vnd.oasis.opendocument.text",
        ),
        description="MIME types bridged; 'type/*' matches a whole family",
    )
    chunk_size: int = Field(64 * 1024, ge=4096, le=4 * 1024 * 1024)
    fetch_attempts: int = Field(
        3,
        ge=1,
        le=20,
        description="Tries at fetching one file from the homeserver (a remote server unreachable, "
        "a 502...) before that message fails; the homeserver itself down spends none",
    )
    fetch_timeout_s: float = Field(
        20.0,
        gt=0,
        le=600,
        description="Longest wait for the homeserver to start answering one try at a file",
    )

    def allows(self, mime_type: str) -> bool:
        major = mime_type.split("/", 1)[0].strip().lower()
        wanted = {mime_type.strip().lower(), f"{major}/*", "*/*"}
        return any(pattern.lower() in wanted for pattern in self.allowed_mime_types)


class DeliveryConfig(_Strict):
    max_attempts: int = Field(
        10, ge=1, description="Retry budget of one delivery a vendor refuses (5xx, 429...)"
    )
    success_statuses: bool = Field(
        False,
        description="Also confirm plain successes (degraded and failed deliveries always are)",
    )


class ReconcileConfig(_Strict):
    """Reading portal rooms' timelines for events the homeserver never pushed (see README)."""

    interval_s: float = Field(
        300.0, ge=0, description="Seconds between periodic sweeps; 0: only after signs of a fault"
    )
    active_within_s: float = Field(
        3600.0, gt=0, description="Rooms with homeserver events this recent are read"
    )
    max_rooms: int = Field(100, ge=1, description="Most rooms read by one pass")
    max_pages: int = Field(5, ge=1, description="Most /messages pages read per room and pass")
    page_size: int = Field(100, ge=10, le=1000, description="Events per /messages page")
    hold_transactions_s: float = Field(
        20.0, gt=0, le=50, description="Longest a transaction waits for a pass before it is stored"
    )
    gap_wait_s: float = Field(
        15.0,
        ge=0,
        le=600,
        description="Longest a room's events from other servers wait for the events they follow "
        "(a gap in what the homeserver holds); 0: forward them as pushed",
    )


class TrustConfig(_Strict):
    """The EIMIS trust space: homeservers whose users may share a conversation with the bridge's.

    The bridge's own ``homeserver.domain`` is always trusted; ``eimis-bridge trust add`` adds
    more at run time (stored in the database, picked up by the running bridge).
    """

    servers: tuple[str, ...] = Field(
        (), description="Server names (hostname[:port]) of the trust space besides our own"
    )
    poll_interval_s: float = Field(
        2.0, gt=0, le=5, description="How often the running bridge re-reads the trust list"
    )

    @field_validator("servers", mode="before")
    @classmethod
    def _server_names(cls, value: Any) -> Any:
        from bridge.values.trust import InvalidServerName, validate_server_name

        if value is None:
            return ()
        if not isinstance(value, list | tuple):
            raise ValueError("must be a list of server names (hostname[:port])")
        names = []
        for index, item in enumerate(value):
            try:
                names.append(validate_server_name(item))
            except InvalidServerName as error:
                raise ValueError(f"entry {index}: {error}") from None
        return tuple(names)


class DirectoryConfig(_Strict):
    """The directory of professionals (README, "The directory"): the FHIR endpoint that
    ``eimis-bridge directory fetch`` reads, and how often the running bridge applies changes."""

    fhir_url: str | None = Field(
        None, description="FHIR R4 base URL of the Annuaire Santé API (Practitioner search)"
    )
    fhir_api_key: SecretStr | None = Field(
        None, description="Sent as the ESANTE-API-KEY header; write it ${ENV_VAR}"
    )
    fhir_page_size: int = Field(100, ge=1, le=1000, description="Practitioners per FHIR page")
    mailbox_domains: tuple[str, ...] = Field(
        (),
        description="Secure-mail domains besides the national one: an e-mail address of a "
        "FHIR Practitioner in one of them (or a subdomain) is a secure mailbox",
    )
    sync_interval_s: float = Field(
        10.0, ge=0, description="How often the running bridge renames ghosts after imports"
    )
    publish_interval_s: float = Field(
        3600.0,
        ge=0,
        description="How often the running bridge lists connectors' users and publishes the "
        "directory's ghosts in the homeserver's user directory (0: only at start)",
    )

    @field_validator("fhir_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/") if value else value


class IdentityConfig(_Strict):
    """Who a ghost may stand for (README, "The directory")."""

    require_directory_entry: bool = Field(
        False,
        description="A vendor user becomes a ghost only when the imported directory (ANS "
        "extract or FHIR) lists their IDNPS",
    )


class SecretsConfig(_Strict):
    """The key that seals secrets at rest (connector credentials, webhook secrets): AES-256-GCM.

    The key is 32 random bytes, base64-encoded, read from ``key_file`` or else from the
    environment variable named ``key_env``. Rotation: put the new key in place, list the old
    one's file in ``previous_key_files`` (read-only: it still opens what it sealed), run
    ``eimis-bridge secrets rotate`` (everything is sealed again with the new key), then drop it.
    """

    key_file: Path | None = Field(None, description="File holding the base64 key (mode 0600)")
    key_env: str = Field("EIMIS_SECRETS_KEY", description="Environment variable with the key")
    previous_key_files: tuple[Path, ...] = Field(
        (), description="Keys being rotated out: they open, never seal"
    )


class MetricsConfig(_Strict):
    """Prometheus metrics, on a listener of their own (not the appservice's)."""

    enabled: bool = True
    hostname: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535, description="0: any free port")


class AuditConfig(_Strict):
    """The audit log: metadata of every delivery (never content)."""

    retention_days: float = Field(
        183.0, gt=0, description="Kept this long after the conversation's last activity"
    )
    purge_interval_s: float = Field(3600.0, gt=0, description="How often expired rows go")


class AdminConfig(_Strict):
    """The admin room: a direct chat between an operator and the bridge bot."""

    admins: tuple[str, ...] = Field((), description="Matrix IDs allowed to run commands")
    notify_debounce_s: float = Field(
        30.0, ge=0, description="Alerts within this window are grouped into one message"
    )
    stalled_after_s: float = Field(
        300.0,
        gt=0,
        description="A connector with messages waiting and none delivered this "
        "long is reported as stalled",
    )
    confirm_within_s: float = Field(
        120.0, gt=0, description="How long a destructive command waits for its confirmation"
    )


class EncryptionConfig(_Strict):
    """End-to-bridge encryption (Megolm rooms), on vodozemac.

    The bridge decrypts what native users send before a vendor gets it and encrypts what
    vendors send before the homeserver sees it; each ghost speaks from its own device,
    cross-signed by its own identity. Sessions are pickled under a key sealed with
    ``secrets`` (so a secrets key is needed). The homeserver must push to-device events and
    device lists to the bridge (Synapse: ``experimental_features``
    ``msc2409_to_device_messages_enabled`` and ``msc3202_transaction_extensions``).
    """

    enabled: bool = Field(True, description="Take part in encrypted rooms")
    default: bool = Field(
        True, description="Portals the bridge creates are encrypted (when enabled)"
    )
    require: bool = Field(
        False, description="Refuse to bridge a room that is not encrypted (TI-Messenger)"
    )
    cross_signing: bool = Field(True, description="Each ghost cross-signs its own device")
    key_wait_s: float = Field(
        60.0,
        gt=0,
        description="How long an event waits for its room key before its sender is told it "
        "could not be delivered",
    )

    @model_validator(mode="after")
    def _coherent(self) -> EncryptionConfig:
        if self.require and not self.enabled:
            raise ValueError("require needs enabled: true")
        return self


class BackfillConfig(_Strict):
    """History a portal gets when the bridge first links a conversation that already has some."""

    max_messages: int = Field(
        50, ge=0, le=10_000, description="At most this many of the latest messages (0: none)"
    )
    max_age_days: float = Field(
        30, gt=0, description="Only messages written this many days ago or less"
    )


class PortalConfig(_Strict):
    """Portal rooms as the homeserver stores them."""

    backfill: BackfillConfig = BackfillConfig()

    titles_in_room_state: bool = Field(
        False,
        description="Put a conversation's title in its portal's m.room.name (room state is never "
        "end-to-end encrypted: every homeserver of the room stores it in clear, and titles may "
        "name patients); off: Matrix clients name the room after its members, vendors still "
        "get the title",
    )


class BridgeConfig(_Strict):
    """What people read from the bridge (README, "In French")."""

    locale: Literal["fr", "en"] = Field(
        "fr",
        description="Language of every text clinicians and vendor users read (bridge/i18n.py)",
    )


class LoggingConfig(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = Field(False, alias="json")


class Config(_Strict):
    homeserver: HomeserverConfig
    appservice: AppserviceConfig
    bridge: BridgeConfig = BridgeConfig()
    database: DatabaseConfig = DatabaseConfig()
    connectors: dict[str, ConnectorConfig] = Field(default_factory=dict)
    media: MediaConfig = MediaConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    reconcile: ReconcileConfig = ReconcileConfig()
    trust: TrustConfig = TrustConfig()
    directory: DirectoryConfig = DirectoryConfig()
    identity: IdentityConfig = IdentityConfig()
    secrets: SecretsConfig = SecretsConfig()
    metrics: MetricsConfig = MetricsConfig()
    audit: AuditConfig = AuditConfig()
    admin: AdminConfig = AdminConfig()
    encryption: EncryptionConfig = EncryptionConfig()
    portal: PortalConfig = PortalConfig()
    logging: LoggingConfig = LoggingConfig()

    @field_validator("connectors")
    @classmethod
    def _connector_ids(cls, value: dict[str, ConnectorConfig]) -> dict[str, ConnectorConfig]:
        for name in value:
            if not CONNECTOR_ID.fullmatch(name) or name in RESERVED_CONNECTOR_IDS:
                raise ValueError(
                    f"connector id {name!r} must be 1-32 lower-case letters and digits, starting "
                    f"with a letter, and not one of {sorted(RESERVED_CONNECTOR_IDS)}"
                )
        return value

    @property
    def bot_mxid(self) -> str:
        return f"@{self.appservice.bot_username}:{self.homeserver.domain}"


def _expand_env(node: Any, path: str) -> Any:
    if isinstance(node, dict):
        return {k: _expand_env(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v, f"{path}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str):
        match = _ENV_REF.match(node)
        if match:
            name = match.group(1)
            if name not in os.environ:
                raise ConfigError(f"{path}: environment variable {name} is not set")
            return os.environ[name]
    return node


def format_validation_error(error: ValidationError, prefix: str = "") -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"] if part not in ("function-after",))
        key = f"{prefix}{key}" if key else prefix.rstrip(".") or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{key}: {message}")
    return "\n".join(lines)


def parse_config(data: Any, *, base_dir: Path | None = None) -> Config:
    if not isinstance(data, dict):
        raise ConfigError("the configuration file must be a YAML mapping of sections")
    data = _expand_env(data, "")
    try:
        config = Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None
    if base_dir is not None:
        config = _relative_to(config, base_dir)
    return config


def _relative_to(config: Config, base_dir: Path) -> Config:
    """Relative file paths in the config are relative to the config file, not the cwd."""
    registration = config.appservice.registration
    if registration is not None and not registration.is_absolute():
        appservice = config.appservice.model_copy(update={"registration": base_dir / registration})
        config = config.model_copy(update={"appservice": appservice})
    if config.database.is_sqlite:
        path = Path(config.database.url.removeprefix("sqlite:").removeprefix("//"))
        if not path.is_absolute():
            database = config.database.model_copy(update={"url": f"sqlite:{base_dir / path}"})
            config = config.model_copy(update={"database": database})
    return config


def load_config(path: Path) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read the configuration file {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a UTF-8 text file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {yaml_problem(error)}") from None
    return parse_config(data, base_dir=path.parent)


def yaml_problem(error: yaml.YAMLError) -> str:
    """Where and what (``line 3, column 8: found unexpected end of stream``), never the text:
    PyYAML's own message quotes the offending line, which may hold a secret."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or type(error).__name__
    problem = re.sub(r"'[^']{4,}'", "'...'", str(problem))  # a tag or alias name: not quoted
    if mark is None:
        return str(problem)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def load_tokens(config: Config) -> tuple[str, str]:
    """The (as_token, hs_token) pair, from the config or the registration file it names."""
    a = config.appservice
    if a.as_token and a.hs_token:
        return a.as_token, a.hs_token
    assert a.registration is not None
    try:
        registration = yaml.safe_load(a.registration.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        why = yaml_problem(error) if isinstance(error, yaml.YAMLError) else error.strerror
        raise ConfigError(
            f"appservice.registration: cannot read {a.registration} ({why}); run "
            "'eimis-bridge generate-registration' first"
        ) from None
    try:
        return a.as_token or registration["as_token"], a.hs_token or registration["hs_token"]
    except (KeyError, TypeError):
        raise ConfigError(
            f"appservice.registration: {a.registration} has no as_token/hs_token"
        ) from None
