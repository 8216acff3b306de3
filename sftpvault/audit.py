"""The key audit log: one JSON object per line, appended, never rewritten.

Every key operation (DEK created, unwrapped, rewrapped, rotated, retired, KEK
rotated or migrated) is recorded with who, what, which key and version, when
and the result. Key material never goes in here.
"""

from __future__ import annotations

import getpass
import json
import os
import threading
import time
from pathlib import Path
from typing import Any


class AuditLog:
    def __init__(self, path: Path, actor: str | None = None) -> None:
        self.path = path
        self.actor = actor or _whoami()
        self._lock = threading.Lock()

    def record(self, action: str, result: str = "ok", **fields: Any) -> None:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "actor": self.actor,
            "action": action,
            "result": result,
            **fields,
        }
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        with self._lock:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line)  # one write with O_APPEND: lines from several processes never interleave
            finally:
                os.close(fd)

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _whoami() -> str:
    try:
        return f"{getpass.getuser()}@cli"
    except (KeyError, OSError):
        return f"uid{os.getuid()}@cli"
