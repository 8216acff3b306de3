"""sftpvault: an SFTP server that stores every file encrypted at rest."""

__version__ = "0.1.0"
