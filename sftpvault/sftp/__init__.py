"""The SFTP subsystem: wire protocol and per-channel session."""
