"""Several Synapse homeservers on this machine, federating over loopback TLS with a local CA.

Federation is always TLS, between server *names*. Each homeserver of a :class:`LocalFederation`
gets:

- a server name ``<label>-<run tag>.eimis.test`` (``.test`` is reserved, RFC 6761; the tag
  keeps concurrent runs apart), resolved to a loopback address of its own (127.0.0.11, .12, ...:
  the whole 127.0.0.0/8 is local on Linux) through an entry in ``/etc/hosts``
  (:class:`HostsEntries`: added in a marked block, always removed);
- a certificate for that name (``subjectAltName=DNS:<name>``), signed by a CA generated for
  the run (``cryptography``, no openssl);
- besides LocalSynapse's plain HTTP listener on 127.0.0.1 (what clients and the bridge use), a
  TLS listener on ``<address>:443`` with resources ``client`` and ``federation``, and
  ``serve_server_wellknown`` (``/.well-known/matrix/server`` says ``<name>:443``);
- ``federation_verify_certificates`` against ``federation_custom_ca_list: [ca.pem]``,
  ``ip_range_whitelist: [127.0.0.0/8]`` (loopback is refused by default), and its own
  ``federation_domain_whitelist`` (``None``: federates with anyone).

With ``bridge_on=<label>``, that homeserver is the one of a :class:`LocalStack` (bridge and
vendor sandboxes included), configured the same way.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import datetime
import errno
import fcntl
import ipaddress
import logging
import os
import re
import secrets
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bridge.devtools.ports import port_is_free
from bridge.devtools.stack import LocalStack
from bridge.devtools.synapse import LocalSynapse

__all__ = [
    "FederatedServer",
    "HostsEntries",
    "HostsFileError",
    "LocalCA",
    "LocalFederation",
    "hosts_file_writable",
    "remove_stale_blocks",
]

log = logging.getLogger(__name__)

HOSTS_PATH = Path("/etc/hosts")
DOMAIN_SUFFIX = "eimis.test"
FEDERATION_PORT = 443
_LOCK_PATH = Path(tempfile.gettempdir()) / "eimis-bridge-hosts.lock"
_BEGIN = "# >>> eimis-bridge federation test {tag} pid {pid} >>>"
_END = "# <<< eimis-bridge federation test {tag} <<<"
_BLOCK = re.compile(
    r"^# >>> eimis-bridge federation test (?P<tag>[0-9a-z]+) pid (?P<pid>\d+) >>>\n"
    r".*?"
    r"^# <<< eimis-bridge federation test (?P=tag) <<<\n",
    re.MULTILINE | re.DOTALL,
)


class HostsFileError(RuntimeError):
    """/etc/hosts could not be changed (not root, read-only file system, ...)."""


# -- /etc/hosts --------------------------------------------------------------------------------


def hosts_file_writable(path: Path = HOSTS_PATH) -> str | None:
    """None when ``path`` can be edited, else why not (for a clear skip or failure)."""
    if not path.exists():
        return f"{path} does not exist"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"{path} is not writable by this user (uid {os.getuid()}); run as root"
    try:
        with open(path, "r+b"):
            pass
    except OSError as e:
        return f"{path} cannot be opened for writing: {e}"
    return None


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One editor of the hosts file at a time, across processes (concurrent test runs)."""
    fd = os.open(_LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_hosts(path: Path, text: str) -> None:
    """Replace the file's content at once: a new file renamed over it (readers see the old or
    the new file, never half of one), or, where the file cannot be replaced (a bind mount, as
    Docker makes of /etc/hosts), one in-place write of the whole content."""
    data = text.encode()
    st = path.stat()
    fd, tmp = tempfile.mkstemp(prefix=".hosts.eimis-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), st.st_mode & 0o7777)
            with contextlib.suppress(PermissionError):
                os.fchown(f.fileno(), st.st_uid, st.st_gid)
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if e.errno not in (errno.EBUSY, errno.EXDEV, errno.EPERM, errno.EACCES, errno.EROFS):
            raise
        if e.errno == errno.EROFS:
            raise HostsFileError(f"{path} is on a read-only file system") from e
    # In place: truncate and write the whole content in one call.
    try:
        with open(path, "r+b") as f:
            f.write(data)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise HostsFileError(f"cannot write {path}: {e}") from e


def remove_stale_blocks(path: Path = HOSTS_PATH) -> int:
    """Remove the blocks of runs whose process is gone (killed before it could clean up).
    Returns how many were removed."""
    with _locked():
        text = path.read_text()
        stale = [m for m in _BLOCK.finditer(text) if not _pid_alive(int(m["pid"]))]
        if not stale:
            return 0
        for match in reversed(stale):
            text = text[: match.start()] + text[match.end() :]
        _write_hosts(path, text)
        return len(stale)


class HostsEntries:
    """Name → address entries in ``/etc/hosts`` for the life of a ``with`` block.

    The entries go in one block marked with this run's tag and pid; leaving the block (also on
    an exception), interpreter exit (``atexit``, which a Ctrl-C reaches) and SIGTERM (turned
    into ``SystemExit`` while the block is active, when no other handler was set) remove exactly
    that block; a block of a process that no longer exists (SIGKILL) is removed by the next run.
    Adding and removing are idempotent, and each is one atomic replacement of the file.
    """

    def __init__(self, entries: Mapping[str, str], *, tag: str, path: Path = HOSTS_PATH) -> None:
        if not re.fullmatch(r"[0-9a-z]+", tag):
            raise ValueError(f"tag must be lower-case letters and digits, not {tag!r}")
        for name, address in entries.items():
            ipaddress.ip_address(address)
            if not re.fullmatch(r"[0-9a-z.-]+", name):
                raise ValueError(f"not a host name: {name!r}")
        self.entries = dict(entries)
        self.tag = tag
        self.path = path
        self._active = False
        self._previous_sigterm: Any = None

    def block(self) -> str:
        lines = [_BEGIN.format(tag=self.tag, pid=os.getpid())]
        lines += [f"{address} {name}" for name, address in self.entries.items()]
        lines.append(_END.format(tag=self.tag))
        return "\n".join(lines) + "\n"

    def _without_mine(self, text: str) -> str:
        return _BLOCK.sub(lambda m: "" if m["tag"] == self.tag else m.group(0), text)

    def add(self) -> None:
        """Write the block (replacing one of the same tag); stale blocks of dead runs go too."""
        reason = hosts_file_writable(self.path)
        if reason is not None:
            raise HostsFileError(reason)
        remove_stale_blocks(self.path)
        with _locked():
            text = self._without_mine(self.path.read_text())
            if text and not text.endswith("\n"):
                text += "\n"
            _write_hosts(self.path, text + self.block())
        self._active = True
        atexit.register(self.remove)
        self._catch_sigterm()
        log.info("Added %d /etc/hosts entries (tag %s)", len(self.entries), self.tag)

    def remove(self) -> None:
        """Remove this run's block if present (safe to call any number of times)."""
        try:
            with _locked():
                text = self.path.read_text()
                kept = self._without_mine(text)
                if kept != text:
                    _write_hosts(self.path, kept)
        finally:
            self._active = False
            atexit.unregister(self.remove)
            self._release_sigterm()

    def present(self) -> bool:
        return any(m["tag"] == self.tag for m in _BLOCK.finditer(self.path.read_text()))

    def _catch_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return  # someone handles it already: their exit path runs atexit
        self._previous_sigterm = signal.SIG_DFL
        signal.signal(signal.SIGTERM, _sigterm_exit)

    def _release_sigterm(self) -> None:
        if self._previous_sigterm is None:
            return
        if threading.current_thread() is threading.main_thread():
            with contextlib.suppress(ValueError):
                if signal.getsignal(signal.SIGTERM) is _sigterm_exit:
                    signal.signal(signal.SIGTERM, self._previous_sigterm)
        self._previous_sigterm = None

    def __enter__(self) -> Self:
        self.add()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()


def _sigterm_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


# -- certificates ------------------------------------------------------------------------------


class LocalCA:
    """A certificate authority for one run, and certificates for server names."""

    def __init__(self, directory: Path, name: str = "eimis-bridge test CA") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        public = self._key.public_key()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.ca_path = directory / "ca.pem"
        self.ca_path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def issue(self, server_name: str) -> tuple[Path, Path]:
        """A key and a certificate for ``server_name`` (``subjectAltName=DNS:<name>``);
        returns (certificate path, key path)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        ca_public = self._key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(server_name)]), False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        cert_path = self.directory / f"{server_name}.crt.pem"
        key_path = self.directory / f"{server_name}.key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        return cert_path, key_path


# -- the federation ----------------------------------------------------------------------------


@dataclass
class FederatedServer:
    label: str
    """Short name in the test (``hs1``)."""
    server_name: str
    address: str
    """Loopback address of its TLS listener (port 443)."""
    whitelist: tuple[str, ...] | None
    """Its ``federation_domain_whitelist`` (server names), None: open."""
    certificate: Path
    private_key: Path
    synapse: LocalSynapse | None = None

    @property
    def url(self) -> str:
        """Its client-server API over plain HTTP on 127.0.0.1 (what tests use)."""
        assert self.synapse is not None
        return self.synapse.url

    @property
    def federation_url(self) -> str:
        return f"https://{self.server_name}"


def _loopback_addresses(count: int, first: int = 11) -> list[str]:
    """``count`` loopback addresses on which port 443 is free, from 127.0.0.<first> on."""
    found: list[str] = []
    for last in range(first, 255):
        address = f"127.0.0.{last}"
        if port_is_free(FEDERATION_PORT, address):
            found.append(address)
            if len(found) == count:
                return found
    raise RuntimeError(f"fewer than {count} loopback addresses have port 443 free")


class LocalFederation:
    """Homeservers ``servers`` (label → whitelist as labels, or None for open), started
    together; each trusts the run's CA, finds the others through /etc/hosts.

    ``bridge_on``: the label whose homeserver is a :class:`LocalStack`'s (``stack_options``
    are its keyword arguments, or a function of the server names by label returning them,
    e.g. for a ``trust`` config section); that stack (bridge, sandboxes) is in :attr:`stack`.
    ``synapse_options``: per label, more LocalSynapse keyword arguments (``log_levels`` ...).
    """

    def __init__(
        self,
        state_dir: Path,
        servers: Mapping[str, Sequence[str] | None],
        *,
        bridge_on: str | None = None,
        stack_options: Mapping[str, Any]
        | Callable[[dict[str, str]], Mapping[str, Any]]
        | None = None,
        synapse_options: Mapping[str, Mapping[str, Any]] | None = None,
        hosts_path: Path = HOSTS_PATH,
        tag: str | None = None,
    ) -> None:
        if bridge_on is not None and bridge_on not in servers:
            raise ValueError(f"bridge_on={bridge_on!r} is not one of {list(servers)}")
        for label, allowed in servers.items():
            unknown = set(allowed or ()) - set(servers)
            if unknown:
                raise ValueError(f"whitelist of {label} names unknown servers {sorted(unknown)}")
        self.state_dir = Path(state_dir).resolve()
        self.tag = tag or secrets.token_hex(3)
        self.ca = LocalCA(self.state_dir / "tls")
        addresses = _loopback_addresses(len(servers))
        names = {label: f"{label}-{self.tag}.{DOMAIN_SUFFIX}" for label in servers}
        self.servers: dict[str, FederatedServer] = {}
        for (label, allowed), address in zip(servers.items(), addresses, strict=True):
            cert, key = self.ca.issue(names[label])
            whitelist = None if allowed is None else tuple(names[a] for a in allowed)
            if whitelist is not None and names[label] not in whitelist:
                whitelist = (names[label], *whitelist)  # a server always talks to itself
            self.servers[label] = FederatedServer(
                label, names[label], address, whitelist, cert, key
            )
        self.hosts = HostsEntries(
            {s.server_name: s.address for s in self.servers.values()},
            tag=self.tag,
            path=hosts_path,
        )
        self.stack: LocalStack | None = None
        per_label = synapse_options or {}
        for label, server in self.servers.items():
            options = self.synapse_options(label, per_label.get(label))
            if label == bridge_on:
                if callable(stack_options):
                    stack_kwargs = dict(stack_options(names))
                else:
                    stack_kwargs = dict(stack_options or {})
                self.stack = LocalStack(
                    self.state_dir / label,
                    server_name=server.server_name,
                    synapse_options=options,
                    **stack_kwargs,
                )
                server.synapse = self.stack.synapse
            else:
                server.synapse = LocalSynapse(
                    self.state_dir / label, server_name=server.server_name, **options
                )

    def __getitem__(self, label: str) -> FederatedServer:
        return self.servers[label]

    def server_name(self, label: str) -> str:
        return self.servers[label].server_name

    def synapse_options(self, label: str, more: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """LocalSynapse keyword arguments making ``label`` a member of this federation."""
        server = self.servers[label]
        options = dict(more or {})
        extra: dict[str, Any] = {
            "tls_certificate_path": str(server.certificate),
            "tls_private_key_path": str(server.private_key),
            "serve_server_wellknown": True,
            "federation_verify_certificates": True,
            "federation_custom_ca_list": [str(self.ca.ca_path)],
            "ip_range_whitelist": ["127.0.0.0/8"],
            # Keys are fetched from each origin directly: no notary server.
            "trusted_key_servers": [],
            **dict(options.pop("extra_config", {})),
        }
        if server.whitelist is not None:
            extra["federation_domain_whitelist"] = list(server.whitelist)
        listener = {
            "port": FEDERATION_PORT,
            "bind_addresses": [server.address],
            "type": "http",
            "tls": True,
            "x_forwarded": False,
            "resources": [{"names": ["client", "federation"], "compress": False}],
        }
        return {
            **options,
            "extra_config": extra,
            "extra_listeners": [listener, *options.get("extra_listeners", ())],
        }

    async def start(self) -> None:
        """Add the /etc/hosts entries, then start every homeserver (and the stack) at once."""
        self.hosts.add()
        try:
            starts = []
            for server in self.servers.values():
                if self.stack is not None and server.synapse is self.stack.synapse:
                    starts.append(self.stack.start())
                else:
                    assert server.synapse is not None
                    starts.append(server.synapse.start())
            results = await asyncio.gather(*starts, return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise errors[0]
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop everything; the /etc/hosts entries are removed whatever happens."""
        try:
            stops = []
            for server in self.servers.values():
                if self.stack is not None and server.synapse is self.stack.synapse:
                    stops.append(self.stack.stop())
                elif server.synapse is not None:
                    stops.append(server.synapse.stop())
            results = await asyncio.gather(*stops, return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise errors[0]
        finally:
            self.hosts.remove()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
