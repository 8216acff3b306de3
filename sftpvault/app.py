"""The composition root: builds the pieces named in the settings, once.

Both the server and the admin CLI start here, so they agree on where users,
keys and data live and which key service and auth backends are in use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sftpvault.audit import AuditLog
from sftpvault.auth.base import AuthBackend
from sftpvault.auth.certs import CertificateAuthority
from sftpvault.auth.embedded import UserStore, check_user_name
from sftpvault.auth.keysdir import AuthorizedKeysDir
from sftpvault.auth.ldap import LdapBackend
from sftpvault.auth.pam import PamBackend
from sftpvault.config import Settings
from sftpvault.errors import ConfigError
from sftpvault.fsutil import private_dir
from sftpvault.keyring import Keyring, UserKeys
from sftpvault.keyservice.base import KeyService
from sftpvault.keyservice.embedded import EmbeddedKeyService
from sftpvault.keyservice.movault import MoVaultKeyService
from sftpvault.keyservice.transit import TransitKeyService, read_token
from sftpvault.vfs.fs import UserFS


@dataclass
class App:
    settings: Settings
    key_service: KeyService
    keyring: Keyring
    users: UserStore

    backends: list[AuthBackend]
    ca: CertificateAuthority | None

    def user_home(self, user: str) -> Path:
        return private_dir(self.settings.data_dir / check_user_name(user))

    def user_fs(self, user: str, keys: UserKeys) -> UserFS:
        return UserFS(self.user_home(user), keys, self.settings.server.fsync_on_close)


def key_services(settings: Settings) -> dict[str, KeyService]:
    """Every configured key service: embedded always, Transit and Mo-Vault when set up."""
    services: dict[str, KeyService] = {
        "embedded": EmbeddedKeyService(settings.keys_dir / "keystore.json", settings.keystore_passphrase())
    }
    t = settings.transit
    if t.address:
        services["transit"] = TransitKeyService(
            t.address,
            read_token(t.token_file),
            t.mount,
            t.key,
            t.key_type,
            t.namespace,
            t.ca_file,
            t.timeout,
            t.retries,
        )
    m = settings.movault
    if m.url:
        services["movault"] = MoVaultKeyService(
            m.url, m.secret_path, settings.keys_dir / "movault.json", m.ca_file, m.timeout, m.retries
        )
    return services


def auth_backends(settings: Settings, users: UserStore) -> list[AuthBackend]:
    """The configured backends, in the configured order."""
    backends: list[AuthBackend] = []
    for name in settings.auth.backends:
        if name == "embedded":
            backends.append(users)
        elif name == "ldap":
            backends.append(LdapBackend(settings.ldap, ldap_bind_password(settings)))
        elif name == "pam":
            backends.append(PamBackend(settings.pam.service))
        else:
            backends.append(AuthorizedKeysDir(Path(settings.auth.authorized_keys_dir)))
    return backends


def ldap_bind_password(settings: Settings) -> str:
    """The LDAP service account's password, from its file (never from the config itself or argv)."""
    if not settings.ldap.bind_password_file:
        return ""
    try:
        return Path(settings.ldap.bind_password_file).read_text().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"ldap.bind_password_file: {exc.strerror}") from None


def build(settings: Settings, actor: str | None = None) -> App:
    services = key_services(settings)
    audit = AuditLog(settings.keys_dir / "audit.jsonl", actor)
    keyring = Keyring(settings.keys_dir, services, settings.keys.service, audit)
    users = UserStore(settings.users_file)
    ca_file = settings.auth.trusted_user_ca_keys
    ca = CertificateAuthority(Path(ca_file)) if ca_file else None
    return App(settings, keyring.service, keyring, users, auth_backends(settings, users), ca)
