"""The Mo-Vault EaaS API of the original dropzone design, as the KEK holder.

    POST /key/encrypt/rsa  {secret_path, secret_version, plaintext}   -> {"Info": "<hex ciphertext>"}
    POST /key/decrypt/rsa  {secret_path, secret_version, ciphertext}  -> {"Info": "<plaintext>"}
    POST /gen/key/rsa      {secret_path}                              -> {"Info": {"secret_version": N}}

Failures come back as HTTP 200 with {"Error": "..."}; we treat them as errors.
The plaintext travels as text, so the DEK is hex-encoded (with the owner
binding in front: RSA has no associated data). Mo-Vault has no "latest
version", so the version in use is kept in `keys/movault.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sftpvault.errors import KeyServiceError
from sftpvault.fsutil import atomic_write
from sftpvault.keyservice.base import KeyService, WrappedKey, bind, unbind
from sftpvault.keyservice.http import JsonClient

ALGORITHM = "movault-rsa"


class MoVaultKeyService(KeyService):
    service_id = "movault"

    def __init__(
        self, url: str, secret_path: str, state_file: Path, ca_file: str = "", timeout: float = 5.0, retries: int = 2
    ) -> None:
        self.http = JsonClient(url, "Mo-Vault key service", {}, timeout, retries, ca_file)
        self.kek_name = secret_path
        self.state_file = state_file

    def wrap(self, plaintext: bytes, context: bytes) -> WrappedKey:
        version = self.latest_version()
        answer = self._call(
            "/key/encrypt/rsa",
            {"secret_path": self.kek_name, "secret_version": version, "plaintext": bind(plaintext, context).hex()},
        )
        if not isinstance(answer, str):
            raise KeyServiceError("the Mo-Vault key service returned no ciphertext")
        return WrappedKey(self.service_id, self.kek_name, version, ALGORITHM, answer)

    def unwrap(self, wrapped: WrappedKey, context: bytes) -> bytes:
        answer = self._call(
            "/key/decrypt/rsa",
            {"secret_path": wrapped.kek_name, "secret_version": wrapped.kek_version, "ciphertext": wrapped.ciphertext},
        )
        try:
            return unbind(bytes.fromhex(str(answer)), context)
        except ValueError:
            raise KeyServiceError("the Mo-Vault key service returned a malformed plaintext") from None

    def rotate(self) -> int:
        answer = self._call("/gen/key/rsa", {"secret_path": self.kek_name})
        try:
            version = int(answer["secret_version"])
        except (TypeError, KeyError, ValueError):
            raise KeyServiceError("the Mo-Vault key service did not say which version it created") from None
        atomic_write(self.state_file, json.dumps({"secret_path": self.kek_name, "secret_version": version}).encode())
        return version

    def latest_version(self) -> int:
        try:
            state = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            raise KeyServiceError(
                "no Mo-Vault key version yet: run 'sftpvault serve' or 'sftpvault kek rotate'"
            ) from None
        return int(state["secret_version"])

    def health(self) -> None:
        self.latest_version()

    def startup(self) -> list[str]:
        """Create the first key version on first use."""
        if self.state_file.exists():
            return []
        return [f"created Mo-Vault key {self.kek_name} version {self.rotate()}"]

    def _call(self, path: str, body: dict[str, Any]) -> Any:
        status, answer = self.http.request("POST", path, body)
        if status != 200 or not isinstance(answer, dict):
            raise KeyServiceError(f"the Mo-Vault key service answered HTTP {status}")
        if "Error" in answer:
            raise KeyServiceError(f"the Mo-Vault key service refused: {answer['Error']}")
        if "Info" not in answer:
            raise KeyServiceError("the Mo-Vault key service gave neither Info nor Error")
        return answer["Info"]
