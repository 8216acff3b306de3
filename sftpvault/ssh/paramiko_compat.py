"""The one place we reach into paramiko internals (pinned: paramiko >=5.1,<6).

paramiko asks `check_auth_publickey` both for unsigned probes and for signed
requests, and verifies the signature itself afterwards, without telling the
ServerInterface which happened. Multi-factor rules must count a public key
only once its signature verified. paramiko calls `AuthHandler._send_auth_result`
exactly then (a probe returns early with PK_OK), so this hook passes that
verified outcome to `server_object.auth_result()`, which may turn it into a
partial success or a failure. tests/test_mfa.py checks the hook is in effect.
"""

from __future__ import annotations

from typing import Any

import paramiko.transport
from paramiko.auth_handler import AuthHandler


class VerifiedResultAuthHandler(AuthHandler):
    def _send_auth_result(self, username: str, method: str, result: int) -> None:
        hook = getattr(self.transport.server_object, "auth_result", None)
        if hook is not None:
            result = hook(username, method, result)
        super()._send_auth_result(username, method, result)


def install() -> None:
    """Make new transports use the hooked handler (idempotent)."""
    transport_module: Any = paramiko.transport
    transport_module.AuthHandler = VerifiedResultAuthHandler
