"""A real MSSanté-like mail operator on loopback, from Debian's Postfix and Dovecot, for tests.

``LocalMailSystem(state_dir)`` is an async context manager that runs, under ``state_dir``:

- a test CA (:mod:`bridge.devtools.testca`, IGC-Santé-like names) and a certificate for
  ``mail.<domain>`` of every domain (+ 127.0.0.1); ``ca_file`` is the only trust anchor a client
  needs (TLS 1.2 minimum everywhere);
- a Pro Santé Connect stand-in (:mod:`bridge.devtools.psc`) issuing RS256 tokens, ``token_url``;
- Dovecot 2.3 (``dovecot -c <state>/dovecot/dovecot.conf``): IMAP with STARTTLS (``imap``) and
  implicit TLS (``imaps``), LMTP delivery into one maildir per address, SASL XOAUTH2 and
  OAUTHBEARER through the ``oauth2`` passdb validating JWTs locally (signature, exp/nbf/iat, iss),
  the user named by the token's ``email`` claim; the user table (``add_user``) is a passwd-file
  userdb, so mail to an address nobody has is refused at delivery;
- Postfix 3.7 (``postfix -c <state>/postfix``, its own queue and data directories): a submission
  listener (``smtp``) with STARTTLS required before AUTH, SASL through Dovecot's auth socket, mail
  between the configured domains delivered to Dovecot's LMTP, RFC 3461 DSNs (an unknown mailbox of a
  local domain bounces to the sender as ``multipart/report; report-type=delivery-status``),
  ``message_size_limit`` advertised as SIZE; any other destination is refused (no relay).

Root is required (Postfix's master runs as root; the packages come from apt-get,
:func:`ensure_packages`). ``state_dir`` must be reachable by the ``postfix`` and ``dovecot``
system users (their daemons read it after dropping privileges): it is made mode 0711, and its
parents must let others traverse them (``/tmp/...`` does; pytest's ``tmp_path`` does not).
Every process is stopped on exit, on failure, and on SIGINT/SIGTERM of the owning program
(the signal handlers are installed while the system runs and restored afterwards).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

from bridge.devtools.ports import free_port
from bridge.devtools.psc import DEFAULT_LIFETIME, ProSanteConnectStandIn
from bridge.devtools.testca import TestCA

__all__ = [
    "DEFAULT_DOMAINS",
    "PACKAGES",
    "LocalMailSystem",
    "MailSystemError",
    "ensure_packages",
    "instance_pids",
    "packages_missing",
]

DEFAULT_DOMAINS = ("op1.mssante.localhost", "op2.mssante.localhost")
PACKAGES = ("dovecot-imapd", "dovecot-lmtpd", "postfix")
_BINARIES = ("/usr/sbin/dovecot", "/usr/bin/doveadm", "/usr/sbin/postfix", "/usr/lib/dovecot/lmtp")
_START_TIMEOUT = 15.0
_STOP_TIMEOUT = 3.0  # then SIGKILL: Dovecot's master can linger on idle login processes
_POLL = 0.02
_HOST = "127.0.0.1"
_MAIL_USER = "mail"  # Debian's uid/gid 8: owns the maildirs (Dovecot refuses root mail access)


class MailSystemError(RuntimeError):
    """The mail system could not be installed, configured, started or stopped."""


# -- packages --------------------------------------------------------------------------------


def packages_missing() -> list[str]:
    """Debian packages of :data:`PACKAGES` whose programs are absent."""
    return [] if all(Path(b).exists() for b in _BINARIES) else list(PACKAGES)


def _running_master(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return pid


_SYSTEM_PID_FILES = (Path("/run/dovecot/master.pid"), Path("/var/spool/postfix/pid/master.pid"))


def ensure_packages() -> None:
    """Install Dovecot (IMAP, LMTP) and Postfix with apt-get when missing (root needed).

    Postfix is preseeded "No configuration" (no /etc/postfix/main.cf, no system mail setup); a
    system Dovecot or Postfix the installation started (it was not running before) is stopped.
    """
    if not packages_missing():
        return
    if os.geteuid() != 0:
        raise MailSystemError(f"{', '.join(PACKAGES)} missing and not root: apt-get them")
    before = {p: _running_master(p) for p in _SYSTEM_PID_FILES}
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def run(*args: str, stdin: str | None = None) -> None:
        done = subprocess.run(args, input=stdin, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
            raise MailSystemError(f"{' '.join(args)} failed ({done.returncode}):\n{tail}")

    run(
        "debconf-set-selections", stdin="postfix postfix/main_mailer_type select No configuration\n"
    )
    run("apt-get", "update", "-qq")
    run("apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES)
    for service in ("dovecot", "postfix"):  # policy-rc.d may have prevented the start already
        subprocess.run(["invoke-rc.d", service, "stop"], env=env, capture_output=True)
    for pid_file, was in before.items():
        pid = _running_master(pid_file)
        if pid is not None and was is None:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
    if packages_missing():
        raise MailSystemError("apt-get ran but the mail programs are still missing")


# -- processes -------------------------------------------------------------------------------


def instance_pids(state_dir: Path, marker: str | None = None) -> list[int]:
    """Processes belonging to the instance in ``state_dir``: working directory under it (every
    Postfix daemon chdirs to its queue, Dovecot's to its base_dir), command line naming it, or
    ``marker`` (Dovecot's process titles carry its instance name)."""
    root = str(Path(state_dir).resolve())
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:
                cwd = ""
        except OSError:
            continue
        if (
            cwd == root
            or cwd.startswith(root + "/")
            or root in cmdline
            or (marker is not None and marker in cmdline)
        ):
            found.append(int(entry.name))
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as gone
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _port_answers(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((_HOST, port)) == 0


# -- the system ------------------------------------------------------------------------------


class LocalMailSystem:
    """Postfix + Dovecot + a PSC stand-in on loopback; see the module docstring.

    ``users`` lists ``{"idnps", "address"}`` dicts; ``add_user(idnps, address)`` adds one (before
    or after start). Properties ``smtp``, ``imap``, ``imaps`` are ``"host:port"`` strings.
    """

    def __init__(
        self,
        state_dir: Path | str,
        domains: Sequence[str] = DEFAULT_DOMAINS,
        *,
        message_size_limit: int = 10 * 1024 * 1024,
        token_lifetime: int = DEFAULT_LIFETIME,
        users: Iterable[tuple[str, str]] = (),
    ) -> None:
        if not domains:
            raise ValueError("at least one domain")
        self.state_dir = Path(state_dir).resolve()
        self.domains = tuple(d.lower() for d in domains)
        self.message_size_limit = message_size_limit
        self.instance_name = f"eimis-mail-{os.urandom(4).hex()}"
        self._users: list[tuple[str, str]] = []
        self._dovecot_dir = self.state_dir / "dovecot"
        self._postfix_dir = self.state_dir / "postfix"
        self._queue_dir = self._postfix_dir / "queue"
        self._users_file = self._dovecot_dir / "users"
        self.smtp_port = free_port(_HOST)
        self.imap_port = free_port(_HOST)
        self.imaps_port = free_port(_HOST)
        self.lmtp_port = free_port(_HOST)
        self.psc = ProSanteConnectStandIn(
            self.state_dir / "psc-keys", lambda: list(self._users), lifetime=token_lifetime
        )
        self.ca: TestCA | None = None
        self._started = False
        self._old_handlers: dict[int, Any] = {}
        for idnps, address in users:
            self.add_user(idnps, address)

    # -- public surface

    @property
    def smtp(self) -> str:
        return f"{_HOST}:{self.smtp_port}"

    @property
    def imap(self) -> str:
        return f"{_HOST}:{self.imap_port}"

    @property
    def imaps(self) -> str:
        return f"{_HOST}:{self.imaps_port}"

    @property
    def ca_file(self) -> Path:
        return self.state_dir / "ca" / "ca.pem"

    @property
    def token_url(self) -> str:
        return self.psc.token_url

    @property
    def users(self) -> list[dict[str, str]]:
        return [{"idnps": idnps, "address": address} for idnps, address in self._users]

    def host_name(self, domain: str) -> str:
        """The server name of ``domain``'s operator (in the certificate): ``mail.<domain>``."""
        return f"mail.{domain}"

    def add_user(self, idnps: str, address: str) -> None:
        """Give ``idnps`` the mailbox ``address`` (its domain must be one of ``domains``)."""
        address = address.strip().lower()
        local, _, domain = address.rpartition("@")
        if not local or domain not in self.domains or any(c in address for c in ":\n\r\t /"):
            raise ValueError("the address must be local@<one of the configured domains>")
        if any(c in idnps for c in "\n\r"):
            raise ValueError("bad idnps")
        if (idnps, address) not in self._users:
            self._users.append((idnps, address))
        if self._users_file.parent.exists():
            self._write_users()
        if self._started:
            # Dovecot's passwd-file re-reads a changed file at most once per second (the check is
            # skipped while the clock is in the second of the last one): once the clock has moved
            # on to the next second, every lookup sees the new user.
            written = int(time.time())
            while int(time.time()) == written:
                time.sleep(_POLL)

    def client_ssl_context(self) -> ssl.SSLContext:
        """What a correct client uses: this system's CA only, TLS 1.2 minimum, names checked."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    def pids(self) -> list[int]:
        return instance_pids(self.state_dir, self.instance_name)

    # -- lifecycle

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

    async def start(self) -> None:
        if os.geteuid() != 0:
            raise MailSystemError("the local mail system needs root (Postfix's master does)")
        if packages_missing():
            raise MailSystemError(f"missing packages: {' '.join(PACKAGES)} (ensure_packages())")
        self._prepare_dirs()
        self._install_signal_handlers()
        self._started = True
        try:
            await asyncio.to_thread(self._configure)
            await self.psc.start()
            await asyncio.to_thread(self._start_dovecot)
            await asyncio.to_thread(self._start_postfix)
            await self._wait_ports()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        try:
            await self.psc.stop()
        finally:
            await asyncio.to_thread(self._stop_processes)
            self._restore_signal_handlers()

    # -- internals

    def _prepare_dirs(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(0o711)
        for parent in self.state_dir.parents:
            if not parent.stat().st_mode & 0o001:
                raise MailSystemError(
                    f"{parent} does not let other users traverse it: Postfix's and Dovecot's "
                    "unprivileged daemons could not reach the state directory"
                )

    def _configure(self) -> None:
        self.ca = TestCA(self.state_dir / "ca")
        names = [self.host_name(d) for d in self.domains] + ["localhost"]
        cert = self.ca.issue_server("mail", names)
        mail = pwd.getpwnam(_MAIL_USER)
        self._dovecot_dir.mkdir(exist_ok=True)
        self._dovecot_dir.chmod(0o755)
        maildirs = self.state_dir / "mail"
        maildirs.mkdir(exist_ok=True)
        os.chown(maildirs, mail.pw_uid, mail.pw_gid)
        maildirs.chmod(0o750)
        self._write_users()
        (self._dovecot_dir / "oauth2.conf").write_text(
            _OAUTH2_CONF.format(keys=self.psc.key_dir, issuer=self.psc.issuer)
        )
        (self._dovecot_dir / "dovecot.conf").write_text(
            _DOVECOT_CONF.format(
                d=self._dovecot_dir,
                instance=self.instance_name,
                cert=cert.chain_file,
                key=cert.key_file,
                mail_uid=mail.pw_uid,
                maildirs=maildirs,
                imap=self.imap_port,
                imaps=self.imaps_port,
                lmtp=self.lmtp_port,
                host=_HOST,
                auth_socket=self._queue_dir / "private" / "auth",
                postmaster=f"postmaster@{self.domains[0]}",
            )
        )
        self._postfix_dir.mkdir(exist_ok=True)
        self._postfix_dir.chmod(0o755)
        (self._postfix_dir / "data").mkdir(exist_ok=True)
        self._queue_dir.mkdir(exist_ok=True)
        os.chown(self._queue_dir, 0, 0)
        self._queue_dir.chmod(0o755)
        (self._queue_dir / "private").mkdir(exist_ok=True)
        postfix = pwd.getpwnam("postfix")
        os.chown(self._queue_dir / "private", postfix.pw_uid, 0)
        os.chown(self._postfix_dir / "data", postfix.pw_uid, 0)
        (self._postfix_dir / "main.cf").write_text(
            _MAIN_CF.format(
                p=self._postfix_dir,
                state=self.state_dir,
                myhostname=self.host_name(self.domains[0]),
                domains=", ".join(self.domains),
                lmtp=self.lmtp_port,
                host=_HOST,
                cert=cert.chain_file,
                key=cert.key_file,
                size=self.message_size_limit,
            )
        )
        (self._postfix_dir / "master.cf").write_text(
            _MASTER_CF.format(host=_HOST, port=self.smtp_port)
        )

    def _write_users(self) -> None:
        lines = [f"{address}::::::\n" for _, address in self._users]
        tmp = self._users_file.with_suffix(".tmp")
        tmp.write_text("".join(sorted(set(lines))))
        tmp.chmod(0o644)
        tmp.replace(self._users_file)  # Dovecot re-reads a passwd-file whose mtime changed

    def _run(self, *args: str) -> None:
        """Run a daemon's starter; its output goes to a file (the daemon keeps pipes open)."""
        out_file = self.state_dir / "start.out"
        with out_file.open("ab") as out:
            done = subprocess.run(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=_START_TIMEOUT
            )
        if done.returncode != 0:
            output = out_file.read_text(errors="replace").strip()[-2000:]
            raise MailSystemError(
                f"{' '.join(args)} failed ({done.returncode}): {output}" + self._log_tails()
            )

    def _start_dovecot(self) -> None:
        self._run("/usr/sbin/dovecot", "-c", str(self._dovecot_dir / "dovecot.conf"))

    def _start_postfix(self) -> None:
        self._run("/usr/sbin/postfix", "-c", str(self._postfix_dir), "start")

    async def _wait_ports(self) -> None:
        ports = (self.smtp_port, self.imap_port, self.imaps_port, self.lmtp_port)
        deadline = time.monotonic() + _START_TIMEOUT
        while not await asyncio.to_thread(lambda: all(_port_answers(p) for p in ports)):
            if time.monotonic() > deadline:
                raise MailSystemError("the mail servers did not answer in time" + self._log_tails())
            await asyncio.sleep(_POLL)

    def _masters(self) -> list[int]:
        pids = []
        for pid_file in (
            self._dovecot_dir / "run" / "master.pid",
            self._queue_dir / "pid" / "master.pid",
        ):
            pid = _running_master(pid_file)
            if pid is not None:
                pids.append(pid)
        return pids

    def _stop_processes(self) -> None:
        for pid in self._masters():  # the masters stop their children on SIGTERM
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_TIMEOUT
        while time.monotonic() < deadline:
            if not [p for p in self.pids() if _pid_alive(p)]:
                return
            time.sleep(_POLL)
        for pid in self.pids():  # stragglers (a daemon stuck in a request)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def _log_tails(self) -> str:
        parts = []
        for log in (self._dovecot_dir / "dovecot.log", self._postfix_dir / "postfix.log"):
            with contextlib.suppress(OSError):
                tail = log.read_text(errors="replace").splitlines()[-15:]
                parts.append(f"\n--- {log.name}:\n" + "\n".join(tail))
        return "".join(parts)

    def _install_signal_handlers(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old_handlers[signum] = signal.getsignal(signum)
                signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: the owner handles signals
                self._old_handlers.pop(signum, None)

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._old_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, handler)
        self._old_handlers.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Stop the servers, then let the previous handler (or the default) act."""
        self._started = False
        self._stop_processes()
        previous = self._old_handlers.get(signum)
        self._restore_signal_handlers()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_IGN:
            return
        else:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def remove_state(self) -> None:
        """Delete ``state_dir`` (after stop)."""
        shutil.rmtree(self.state_dir, ignore_errors=True)


_OAUTH2_CONF = """\
# Pro Santé Connect stand-in: JWTs validated locally (Dovecot 2.3 oauth2 passdb)
introspection_mode = local
local_validation_key_dict = fs:posix:prefix={keys}/
username_attribute = email
issuers = {issuer}
tokeninfo_url =
introspection_url =
"""

_DOVECOT_CONF = """\
# Generated by bridge.devtools.mailsystem: a test instance, not the system's Dovecot.
instance_name = {instance}
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = imap lmtp
listen = {host}
shutdown_clients = yes
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = {mail_uid}
postmaster_address = {postmaster}

ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
ssl_min_protocol = TLSv1.2
ssl_prefer_server_ciphers = yes
disable_plaintext_auth = yes

auth_mechanisms = xoauth2 oauthbearer
auth_username_format = %Lu
auth_failure_delay = 0
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {d}/oauth2.conf
}}
userdb {{
  driver = passwd-file
  args = username_format=%Lu {d}/users
  default_fields = uid={mail_uid} gid={mail_uid} home={maildirs}/%Ld/%Ln
}}
mail_location = maildir:~/Maildir

service imap-login {{
  inet_listener imap {{
    address = {host}
    port = {imap}
  }}
  inet_listener imaps {{
    address = {host}
    port = {imaps}
    ssl = yes
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = {host}
    port = {lmtp}
  }}
}}
service auth {{
  unix_listener {auth_socket} {{
    mode = 0660
    user = postfix
    group = postfix
  }}
}}
# No auth penalty (growing delays after failed logins from one IP, all clients here being
# 127.0.0.1, which tests of refused tokens trigger on purpose): the auth process cannot reach
# anvil's penalty socket, the way Dovecot's documentation disables it.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
protocol lmtp {{
  lmtp_rcpt_check_quota = no
}}
"""

_MAIN_CF = """\
# Generated by bridge.devtools.mailsystem: a test instance, not the system's Postfix.
compatibility_level = 3.6
queue_directory = {p}/queue
data_directory = {p}/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file = {p}/postfix.log
maillog_file_prefixes = {state}
inet_interfaces = loopback-only
inet_protocols = ipv4
myhostname = {myhostname}
mydestination =
mynetworks = {host}/32
relay_domains =
relayhost =
alias_maps =
alias_database =
local_recipient_maps =
biff = no
append_dot_mydomain = no
smtputf8_enable = no
virtual_mailbox_domains = {domains}
virtual_mailbox_maps =
virtual_alias_maps =
virtual_transport = lmtp:inet:{host}:{lmtp}
lmtp_host_lookup = native
smtp_host_lookup = native
smtpd_reject_unlisted_recipient = no
smtpd_relay_restrictions = reject_unauth_destination
smtpd_recipient_restrictions = reject_unauth_destination
message_size_limit = {size}
mailbox_size_limit = 0
smtpd_tls_chain_files = {key}, {cert}
smtpd_tls_security_level = encrypt
smtpd_tls_auth_only = yes
smtpd_tls_protocols = >=TLSv1.2
smtpd_tls_mandatory_protocols = >=TLSv1.2
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = private/auth
smtpd_sasl_security_options = noanonymous
smtpd_sasl_tls_security_options = noanonymous
lmtp_tls_security_level = none
smtpd_error_sleep_time = 0
smtpd_soft_error_limit = 1000
smtpd_hard_error_limit = 1000
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 5s
"""

_MASTER_CF = """\
# Generated by bridge.devtools.mailsystem. Nothing chrooted; no port 25: submission only.
{host}:{port} inet n - n - - smtpd
  -o syslog_name=postfix/submission
  -o smtpd_tls_security_level=encrypt
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_client_restrictions=permit_sasl_authenticated,reject
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""
