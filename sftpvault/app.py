"""The composition root: builds the pieces named in the settings, once.

Both the server and the admin CLI start here, so they agree on where users,
keys and data live and which key service and auth backends are in use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sftpvault.auth.base import AuthBackend
from sftpvault.auth.embedded import UserStore, check_user_name
from sftpvault.config import Settings
from sftpvault.fsutil import private_dir
from sftpvault.keyring import Keyring, UserKeys
from sftpvault.keyservice.base import KeyService
from sftpvault.keyservice.embedded import EmbeddedKeyService
from sftpvault.vfs.fs import UserFS


@dataclass
class App:
    settings: Settings
    key_service: KeyService
    keyring: Keyring
    users: UserStore

    @property
    def backends(self) -> list[AuthBackend]:
        return [self.users]

    def user_home(self, user: str) -> Path:
        return private_dir(self.settings.data_dir / check_user_name(user))

    def user_fs(self, user: str, keys: UserKeys) -> UserFS:
        return UserFS(self.user_home(user), keys, self.settings.server.fsync_on_close)


def keystore_path(settings: Settings) -> Path:
    return settings.keys_dir / "keystore.json"


def build(settings: Settings) -> App:
    service = EmbeddedKeyService(keystore_path(settings), settings.keystore_passphrase())
    return App(settings, service, Keyring(settings.keys_dir, service), UserStore(settings.users_file))
