"""Settings: `<home>/sftpvault.toml`, every key optional, validated on load.

The state directory (`--home`, env SFTPVAULT_HOME) holds the config file,
`keys/` (host keys, keystore, wrapped DEKs), `data/<user>/` (encrypted trees)
and `users.json` (the embedded user store). README.md lists every setting.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftpvault.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG_NAME = "sftpvault.toml"
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes192-ctr", "aes256-ctr")


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 2222
    max_connections: int = 200
    workers: int = 0
    pin_workers: bool = True
    login_grace_time: int = 30
    max_auth_tries: int = 6
    max_handles: int = 256
    window_size: int = 32 * 1024 * 1024
    max_packet_size: int = 256 * 1024
    ciphers: list[str] = field(default_factory=lambda: list(CIPHERS))
    fsync_on_close: bool = False
    busy_poll_us: int = 100


@dataclass
class KeySettings:
    service: str = "embedded"
    keystore_passphrase_file: str = ""


@dataclass
class TransitSettings:
    address: str = ""
    mount: str = "transit"
    key: str = "sftpvault"
    key_type: str = "aes256-gcm96"
    token_file: str = ""
    namespace: str = ""
    ca_file: str = ""
    timeout: float = 5.0
    retries: int = 2


@dataclass
class MoVaultSettings:
    url: str = ""
    secret_path: str = "sftpvault"
    ca_file: str = ""
    timeout: float = 5.0
    retries: int = 2


@dataclass
class AuthSettings:
    backends: list[str] = field(default_factory=lambda: ["embedded"])
    authorized_keys_dir: str = ""
    trusted_user_ca_keys: str = ""
    methods: list[str] = field(default_factory=lambda: ["publickey", "password"])
    user_methods: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class LdapSettings:
    url: str = ""
    start_tls: bool = False
    ca_file: str = ""
    user_dn_template: str = ""
    search_base: str = ""
    search_filter: str = "(&(objectClass=posixAccount)(uid={user}))"
    bind_dn: str = ""
    bind_password_file: str = ""
    required_group: str = ""
    ssh_key_attribute: str = "sshPublicKey"
    area_attribute: str = ""
    timeout: float = 5.0


@dataclass
class PamSettings:
    service: str = "sftpvault"


@dataclass
class DefenderSettings:
    enabled: bool = True
    threshold: float = 10.0
    decay_seconds: float = 60.0
    ban_seconds: float = 300.0
    max_ban_seconds: float = 3600.0
    max_unauthenticated_per_source: int = 10
    max_unauthenticated: int = 100
    failed_auth_delay: float = 0.3


@dataclass
class LogSettings:
    level: str = "info"
    file: str = ""


@dataclass
class Settings:
    home: Path
    server: ServerSettings = field(default_factory=ServerSettings)
    keys: KeySettings = field(default_factory=KeySettings)
    transit: TransitSettings = field(default_factory=TransitSettings)
    movault: MoVaultSettings = field(default_factory=MoVaultSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    ldap: LdapSettings = field(default_factory=LdapSettings)
    pam: PamSettings = field(default_factory=PamSettings)
    defender: DefenderSettings = field(default_factory=DefenderSettings)
    log: LogSettings = field(default_factory=LogSettings)

    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def users_file(self) -> Path:
        return self.home / "users.json"

    def keystore_passphrase(self) -> bytes | None:
        """From env SFTPVAULT_KEYSTORE_PASSPHRASE or the configured file; never from argv."""
        if os.environ.get("SFTPVAULT_KEYSTORE_PASSPHRASE"):
            return os.environ["SFTPVAULT_KEYSTORE_PASSPHRASE"].encode()
        if self.keys.keystore_passphrase_file:
            try:
                return Path(self.keys.keystore_passphrase_file).read_bytes().rstrip(b"\r\n")
            except OSError as exc:
                raise ConfigError(f"keys.keystore_passphrase_file: {exc.strerror}") from None
        return None


_SECTIONS = {
    "server": ServerSettings,
    "keys": KeySettings,
    "transit": TransitSettings,
    "movault": MoVaultSettings,
    "auth": AuthSettings,
    "ldap": LdapSettings,
    "pam": PamSettings,
    "defender": DefenderSettings,
    "log": LogSettings,
}
SERVICES = ("embedded", "transit", "movault")
BACKENDS = ("embedded", "ldap", "pam", "authorized_keys")


def _check_section(name: str, cls: type, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"[{name}] must be a table")
    known = {f.name: f for f in dataclasses.fields(cls)}
    defaults = cls()
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown setting {name}.{key}")
        expected = type(getattr(defaults, key))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = values[key] = float(value)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(f"{name}.{key} must be a {expected.__name__}, not {value!r}")
    return cls(**values)


def validate(settings: Settings) -> Settings:
    s = settings.server
    if not 0 < s.port < 65536:
        raise ConfigError(f"server.port must be 1-65535, not {s.port}")
    if not 0 <= s.workers <= 256:
        raise ConfigError(f"server.workers must be 0-256, not {s.workers}")
    if not 0 <= s.busy_poll_us <= 10_000:
        raise ConfigError(f"server.busy_poll_us must be 0-10000, not {s.busy_poll_us}")
    for key in ("max_connections", "login_grace_time", "max_auth_tries", "max_handles"):
        if getattr(s, key) < 1:
            raise ConfigError(f"server.{key} must be at least 1")
    if s.window_size < 2 * s.max_packet_size or not 32 * 1024 <= s.max_packet_size <= 512 * 1024:
        raise ConfigError(
            "server.max_packet_size must be 32768 to 524288 and server.window_size >= 2 x max_packet_size"
        )
    unknown = set(s.ciphers) - set(CIPHERS)
    if unknown or not s.ciphers:
        raise ConfigError(f"server.ciphers may only list {', '.join(CIPHERS)}")
    if settings.keys.service not in SERVICES:
        raise ConfigError(f"keys.service must be one of {', '.join(SERVICES)}, not {settings.keys.service!r}")
    if settings.keys.service == "transit" and not settings.transit.address:
        raise ConfigError("keys.service is transit but transit.address is not set")
    if settings.keys.service == "movault" and not settings.movault.url:
        raise ConfigError("keys.service is movault but movault.url is not set")
    for name in ("transit", "movault"):
        section = getattr(settings, name)
        if section.timeout <= 0 or not 0 <= section.retries <= 10:
            raise ConfigError(f"{name}.timeout must be > 0 and {name}.retries 0-10")
    unknown = [b for b in settings.auth.backends if b not in BACKENDS]
    if unknown or not settings.auth.backends:
        raise ConfigError(f"auth.backends may list {', '.join(BACKENDS)}, not {unknown or 'nothing'}")
    rules = [*settings.auth.methods, *(r for rs in settings.auth.user_methods.values() for r in rs)]
    if not settings.auth.methods or any(m not in ("publickey", "password") for r in rules for m in r.split(",")):
        raise ConfigError('auth.methods rules are lists like ["publickey", "publickey,password"]')
    if "ldap" in settings.auth.backends and not settings.ldap.url:
        raise ConfigError("auth.backends lists ldap but ldap.url is not set")
    if "authorized_keys" in settings.auth.backends and not settings.auth.authorized_keys_dir:
        raise ConfigError("auth.backends lists authorized_keys but auth.authorized_keys_dir is not set")
    if settings.log.level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log.level must be debug, info, warning or error, not {settings.log.level!r}")
    return settings


def load(home: Path) -> Settings:
    """Read `home/sftpvault.toml` if present; every missing key keeps its default."""
    path = home / CONFIG_NAME
    raw: dict[str, Any] = {}
    if path.exists():
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
    sections = {}
    for name, values in raw.items():
        if name not in _SECTIONS:
            raise ConfigError(f"{path}: unknown section [{name}]")
        sections[name] = _check_section(name, _SECTIONS[name], values)
    return validate(Settings(home=home.resolve(), **sections))


DEFAULT_CONFIG = """\
# sftpvault configuration. Every setting is optional; the values shown are the defaults.

[server]
# Address and port to listen on.
host = "127.0.0.1"
port = 2222
# Connections served at once (spread over the workers); further ones are closed at once.
max_connections = 200
# Server processes sharing the port; 0 = one per CPU this process may use.
workers = 0
# With several workers, keep each on one CPU (cheaper thread handoffs, lower latency).
pin_workers = true
# Seconds a connection may take to log in.
login_grace_time = 30
# Failed authentication attempts before the connection is closed.
max_auth_tries = 6
# Open files and directories per SFTP session.
max_handles = 256
# SSH channel receive window and largest SSH packet (bytes): large values keep uploads fast.
window_size = 33554432
max_packet_size = 262144
# Transport ciphers offered (CBC and 3DES are never offered).
ciphers = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes192-ctr", "aes256-ctr"]
# fsync every uploaded file before it replaces the old one (slower; survives power loss).
fsync_on_close = false
# Microseconds to keep polling for a client's next request after answering one, before
# sleeping (as Linux's busy_read). Waking a sleeping thread is slow on VMs; polling spends
# up to this much CPU per answered request. 0 turns it off.
busy_poll_us = 100

[keys]
# Key service that wraps new DEKs: "embedded" (keys/keystore.json), "transit" or "movault".
# Records wrapped by another configured service keep working (see `sftpvault kek migrate`).
service = "embedded"
# File holding the keystore passphrase (or set SFTPVAULT_KEYSTORE_PASSPHRASE).
keystore_passphrase_file = ""

[transit]
# OpenBao / Vault Transit; used when address is set. The token comes from token_file,
# else from env BAO_TOKEN or VAULT_TOKEN.
address = ""
mount = "transit"
key = "sftpvault"
# aes256-gcm96 (created with derived=true: per-user context) or rsa-4096.
key_type = "aes256-gcm96"
token_file = ""
namespace = ""
ca_file = ""
# Seconds per request, and retries (with backoff) on connection errors and 5xx.
timeout = 5.0
retries = 2

[movault]
# The Mo-Vault EaaS API; used when url is set. The key version in use is kept in keys/movault.json.
url = ""
secret_path = "sftpvault"
ca_file = ""
timeout = 5.0
retries = 2

[auth]
# Backends asked in this order; the first that accepts a password or key wins:
# "embedded" (users.json), "ldap", "pam", "authorized_keys" (keys only, from authorized_keys_dir).
backends = ["embedded"]
# Directory of OpenSSH authorized_keys files, one per user name (from= and expiry-time= honoured).
authorized_keys_dir = ""
# File of CA public keys trusted to sign user certificates (like sshd's TrustedUserCAKeys).
trusted_user_ca_keys = ""
# Ways to log in, like sshd's AuthenticationMethods: any one rule suffices; a rule
# "publickey,password" needs both, in that order. Per-user rules: [auth.user_methods].
methods = ["publickey", "password"]

[auth.user_methods]
# alice = ["publickey,password"]

[ldap]
# ldap://host:389 (with start_tls = true) or ldaps://host:636; ca_file verifies the server.
url = ""
start_tls = false
ca_file = ""
# Either a DN template ...
user_dn_template = ""
# ... or a search with a service account ({user} is escaped).
search_base = ""
search_filter = "(&(objectClass=posixAccount)(uid={user}))"
bind_dn = ""
bind_password_file = ""
# Only members of this group (member, uniqueMember or memberUid) may log in.
required_group = ""
# Attribute holding OpenSSH public keys (openssh-lpk schema).
ssh_key_attribute = "sshPublicKey"
# Attribute naming the user's area (its last path component, e.g. homeDirectory /home/alice -> alice,
# or departmentNumber finance): users with the same area share its files and its DEK. Empty: the login name.
area_attribute = ""
timeout = 5.0

[pam]
# PAM service name: install /etc/pam.d/<service> (see README).
service = "sftpvault"

[defender]
# Per-source penalties: every connection that ends without logging in (refused attempts, unknown
# user, or no attempt at all) costs its source 1 point; a point expires after decay_seconds.
# At threshold the source is refused for ban_seconds (doubling for repeat offenders, up to
# max_ban_seconds).
enabled = true
threshold = 10.0
decay_seconds = 60.0
ban_seconds = 300.0
max_ban_seconds = 3600.0
# Unauthenticated connections held at once, per source and in all.
max_unauthenticated_per_source = 10
max_unauthenticated = 100
# Every failed password check takes at least this long (seconds), known user or not.
failed_auth_delay = 0.3

[log]
# debug, info, warning or error; file "" logs to stderr.
level = "info"
file = ""
"""
