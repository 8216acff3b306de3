"""Exception types shared across sftpvault.

Every error an admin or a client may see derives from SftpvaultError, so the
CLI and the SFTP layer can turn them into one readable line without a traceback.
"""


class SftpvaultError(Exception):
    """Base class: the message is safe to show (it never contains secrets)."""


class ConfigError(SftpvaultError):
    """A setting in sftpvault.toml or on the command line is invalid."""


class IntegrityError(SftpvaultError):
    """Ciphertext failed authentication: tampered, truncated or misplaced."""


class KeyServiceError(SftpvaultError):
    """The key service could not wrap, unwrap or rotate a key."""


class UserError(SftpvaultError):
    """Unknown user, duplicate user or an invalid user name."""
