"""Host keys: created on first start (ed25519, ECDSA P-256, RSA 3072), mode 0600."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

log = logging.getLogger("sftpvault.ssh")

_GENERATORS = {
    "ed25519": lambda: ed25519.Ed25519PrivateKey.generate(),
    "ecdsa": lambda: ec.generate_private_key(ec.SECP256R1()),
    "rsa": lambda: rsa.generate_private_key(public_exponent=65537, key_size=3072),
}


def host_key_path(keys_dir: Path, kind: str) -> Path:
    return keys_dir / f"ssh_host_{kind}_key"


def ensure_host_keys(keys_dir: Path) -> list[Path]:
    """Create any missing host key; returns the paths of those created."""
    created = []
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for kind, generate in _GENERATORS.items():
        path = host_key_path(keys_dir, kind)
        if path.exists():
            continue
        pem = generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        created.append(path)
        log.info("created host key %s", path)
    return created


def load_host_keys(keys_dir: Path) -> list[paramiko.PKey]:
    return [paramiko.PKey.from_path(host_key_path(keys_dir, kind)) for kind in _GENERATORS]
