"""OpenSSH `authorized_keys` lines: the key, and the options that limit it.

Supported options: `from="pattern-list"` (addresses, wildcards, CIDR, `!`
negation), `expiry-time="YYYYMMDD[HHMM[SS]][Z]"`, and `command="..."`: a key
forced to a command other than the SFTP server is refused, never silently
widened. Options that only restrict shells or forwarding (`restrict`,
`no-pty`, ...) hold trivially here: sftpvault serves nothing but SFTP.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import fnmatch
import ipaddress
import re
import time
from dataclasses import dataclass

from sftpvault.errors import UserError

KEY_TYPES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
_HARMLESS = {
    "restrict",
    "no-pty",
    "no-port-forwarding",
    "no-agent-forwarding",
    "no-x11-forwarding",
    "no-user-rc",
    "pty",
    "port-forwarding",
    "agent-forwarding",
    "x11-forwarding",
    "user-rc",
    "no-touch-required",
    "verify-required",
    "cert-authority",
    "permitopen",
    "permitlisten",
    "environment",
    "principals",
    "tunnel",
}
_OPTION = re.compile(r'([A-Za-z-]+)(?:="((?:[^"\\]|\\.)*)")?')
_SFTP_COMMANDS = ("internal-sftp", "sftp-server")


@dataclass(frozen=True)
class AuthorizedKey:
    blob: bytes
    line: str  # normalised: options, type, base64, comment
    from_patterns: tuple[str, ...] = ()
    expires: float | None = None
    cert_authority: bool = False

    def allows(self, source_ip: str, now: float | None = None) -> bool:
        if self.expires is not None and (now or time.time()) >= self.expires:
            return False
        return not self.from_patterns or match_source(source_ip, self.from_patterns)


def match_source(ip: str, patterns: tuple[str, ...]) -> bool:
    """OpenSSH pattern-list semantics: a negated match denies, otherwise any match allows."""
    matched = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if _matches(ip, pattern.lstrip("!")):
            if negated:
                return False
            matched = True
    return matched


def _matches(ip: str, pattern: str) -> bool:
    if "/" in pattern:
        try:
            return ipaddress.ip_address(ip) in ipaddress.ip_network(pattern, strict=False)
        except ValueError:
            return False
    return fnmatch.fnmatchcase(ip, pattern)


def _expiry(text: str) -> float:
    """OpenSSH reads expiry-time as local time, or UTC with a trailing Z."""
    digits = text.rstrip("Zz")
    formats = {8: "%Y%m%d", 12: "%Y%m%d%H%M", 14: "%Y%m%d%H%M%S"}
    if len(digits) not in formats or not digits.isdigit():
        raise UserError(f"bad expiry-time {text!r}")
    parsed = time.strptime(digits, formats[len(digits)])
    return float(calendar.timegm(parsed)) if digits != text else time.mktime(parsed)


def parse_authorized_key(line: str) -> AuthorizedKey:
    """Parse one line; UserError if it is not a usable key."""
    text = line.strip()
    options: dict[str, str] = {}
    if text.split(None, 1)[0] not in KEY_TYPES:
        pos = 0
        while pos < len(text) and not text[pos].isspace():
            m = _OPTION.match(text, pos)
            if not m or m.end() == pos:
                raise UserError("malformed options in authorized key line")
            options[m.group(1).lower()] = (m.group(2) or "").replace('\\"', '"')
            pos = m.end()
            if pos < len(text) and text[pos] == ",":
                pos += 1
        text = text[pos:].strip()
    parts = text.split()
    if len(parts) < 2 or parts[0] not in KEY_TYPES:
        raise UserError("not an OpenSSH public key line (expected e.g. 'ssh-ed25519 AAAA... comment')")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except binascii.Error:
        raise UserError("public key is not valid base64") from None
    if not blob.startswith(len(parts[0]).to_bytes(4, "big") + parts[0].encode()):
        raise UserError("public key type does not match its data")
    for name in options:
        if name not in _HARMLESS | {"from", "expiry-time", "command"}:
            raise UserError(f"unsupported authorized_keys option {name!r}")
    command = options.get("command")
    if command is not None and not any(c in command for c in _SFTP_COMMANDS):
        raise UserError("key is restricted to another command than SFTP")
    prefix = line.strip()[: len(line.strip()) - len(text)].strip()
    return AuthorizedKey(
        blob=blob,
        line=" ".join(([prefix] if prefix else []) + parts[:3]),
        from_patterns=tuple(p.strip() for p in options["from"].split(",")) if "from" in options else (),
        expires=_expiry(options["expiry-time"]) if "expiry-time" in options else None,
        cert_authority="cert-authority" in options,
    )
