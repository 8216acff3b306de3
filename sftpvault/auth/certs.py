"""OpenSSH user certificates (PROTOCOL.certkeys), checked here because paramiko does not.

A certificate logs in only if it is signed by a trusted CA key, is a *user*
certificate, lists the login name among its principals, is inside its
validity window, and every critical option is one we honour: `source-address`
(must match the client) and `force-command` (must be the SFTP server).
paramiko itself verifies the client's signature with the certified key.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import paramiko
from paramiko.message import Message

from sftpvault.auth.keys import match_source, parse_authorized_key
from sftpvault.errors import UserError

USER_CERT = 1
_KEY_FIELDS = {
    "ssh-ed25519": ("string",),
    "ssh-rsa": ("mpint", "mpint"),
    "ecdsa-sha2-nistp256": ("string", "string"),
    "ecdsa-sha2-nistp384": ("string", "string"),
    "ecdsa-sha2-nistp521": ("string", "string"),
}
_SFTP_COMMANDS = ("internal-sftp", "sftp-server")


@dataclass(frozen=True)
class Certificate:
    key_type: str
    serial: int
    cert_type: int
    key_id: str
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int
    critical: dict[str, str]
    signature_key: bytes
    signature: bytes
    signed: bytes


def _strings(raw: bytes) -> list[bytes]:
    msg, out = Message(raw), []
    while msg.get_remainder():
        out.append(msg.get_binary())
    return out


def _options(raw: bytes) -> dict[str, str]:
    items = _strings(raw)
    options = {}
    for name, value in zip(items[::2], items[1::2], strict=True):
        inner = _strings(value)
        options[name.decode()] = inner[0].decode() if inner else ""
    return options


def parse_certificate(blob: bytes) -> Certificate:
    msg = Message(blob)
    cert_type_name = msg.get_text()
    key_type = cert_type_name.removesuffix("-cert-v01@openssh.com")
    if key_type == cert_type_name or key_type not in _KEY_FIELDS:
        raise UserError(f"unsupported certificate type {cert_type_name}")
    msg.get_binary()  # nonce
    for field in _KEY_FIELDS[key_type]:
        msg.get_mpint() if field == "mpint" else msg.get_binary()
    serial, cert_type, key_id = msg.get_int64(), msg.get_int(), msg.get_text()
    principals = tuple(p.decode() for p in _strings(msg.get_binary()))
    valid_after, valid_before = msg.get_int64(), msg.get_int64()
    critical = _options(msg.get_binary())
    msg.get_binary()  # extensions: permissions for shells and forwarding, moot for SFTP
    msg.get_binary()  # reserved
    signature_key = msg.get_binary()
    signature = msg.get_binary()
    signed = blob[: len(blob) - 4 - len(signature)]
    return Certificate(
        key_type,
        serial,
        cert_type,
        key_id,
        principals,
        valid_after,
        valid_before,
        critical,
        signature_key,
        signature,
        signed,
    )


class CertificateAuthority:
    """The CA keys trusted to sign user certificates (an OpenSSH TrustedUserCAKeys file)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def trusted(self) -> set[bytes]:
        lines = [line for line in self.path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        return {parse_authorized_key(line).blob for line in lines}

    def check(self, blob: bytes, user: str, source_ip: str, now: float | None = None) -> str | None:
        """None if the certificate may log in as `user`; otherwise why not."""
        try:
            cert = parse_certificate(blob)
        except (UserError, paramiko.SSHException, ValueError, IndexError, UnicodeDecodeError) as exc:
            return f"malformed certificate ({exc})"
        now = time.time() if now is None else now
        if cert.signature_key not in self.trusted():
            return "certificate not signed by a trusted CA"
        ca = paramiko.PKey.from_type_string(Message(cert.signature_key).get_text(), cert.signature_key)
        if not ca.verify_ssh_sig(cert.signed, Message(cert.signature)):
            return "certificate signature is invalid"
        if cert.cert_type != USER_CERT:
            return "not a user certificate"
        if user not in cert.principals:
            return f"certificate {cert.key_id!r} has no principal {user!r}"
        if not cert.valid_after <= now < cert.valid_before:
            return f"certificate {cert.key_id!r} is outside its validity window"
        for name, value in cert.critical.items():
            if name == "source-address" and not match_source(source_ip, tuple(value.split(","))):
                return f"certificate {cert.key_id!r} is not valid from {source_ip}"
            if name == "force-command" and not any(c in value for c in _SFTP_COMMANDS):
                return f"certificate {cert.key_id!r} forces another command"
            if name not in ("source-address", "force-command"):
                return f"certificate {cert.key_id!r} has unknown critical option {name!r}"
        return None
