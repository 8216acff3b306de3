"""The SSH listener, transport setup, host keys and per-connection auth."""
