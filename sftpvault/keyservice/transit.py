"""OpenBao / HashiCorp Vault Transit as the KEK holder.

DEKs are made by `datakey/plaintext`, unwrapped by `decrypt` and moved to the
latest key version by `rewrap`, so rewrapping never exposes a DEK outside
OpenBao. Each wrapped DEK is bound to its user: aes256-gcm96 keys are created
with `derived=true` and the user name is the derivation `context`; RSA keys
have no associated data, so the DEK is encrypted with a hash of the user name
in front of it (checked on unwrap).
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

from sftpvault.errors import KeyServiceError
from sftpvault.keyservice.base import DEK_SIZE, KeyService, WrappedKey, bind, unbind
from sftpvault.keyservice.http import JsonClient

KEY_TYPES = ("aes256-gcm96", "rsa-4096")
BATCH = 100  # items per rewrap request: OpenBao refuses JSON with more than 1000 strings


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _version_of(ciphertext: str) -> int:
    try:
        return int(ciphertext.split(":")[1].lstrip("v"))
    except (IndexError, ValueError):
        raise KeyServiceError("Transit returned an unexpected ciphertext") from None


def read_token(token_file: str) -> str:
    """The token from `token_file`, else env BAO_TOKEN / VAULT_TOKEN; never from argv."""
    if token_file:
        try:
            return Path(token_file).read_text().strip()
        except OSError as exc:
            raise KeyServiceError(f"cannot read the Transit token file: {exc.strerror}") from None
    token = os.environ.get("BAO_TOKEN") or os.environ.get("VAULT_TOKEN")
    if not token:
        raise KeyServiceError("no Transit token: set transit.token_file or BAO_TOKEN/VAULT_TOKEN")
    return token


class TransitKeyService(KeyService):
    service_id = "transit"

    def __init__(
        self,
        address: str,
        token: str,
        mount: str = "transit",
        key: str = "sftpvault",
        key_type: str = "aes256-gcm96",
        namespace: str = "",
        ca_file: str = "",
        timeout: float = 5.0,
        retries: int = 2,
    ) -> None:
        if key_type not in KEY_TYPES:
            raise KeyServiceError(f"transit.key_type must be one of {', '.join(KEY_TYPES)}")
        headers = {"X-Vault-Token": token}
        if namespace:
            headers["X-Vault-Namespace"] = namespace
        self.http = JsonClient(address, "Transit key service", headers, timeout, retries, ca_file)
        self.mount = mount.strip("/")
        self.kek_name = key
        self.key_type = key_type
        self.algorithm = f"transit-{key_type}"

    # -- KeyService -------------------------------------------------------------

    def new_dek(self, context: bytes) -> tuple[bytes, WrappedKey]:
        if self.key_type != "aes256-gcm96":
            return super().new_dek(context)
        data = self._call("POST", f"datakey/plaintext/{self.kek_name}", {"bits": 256, "context": _b64(context)})
        return base64.b64decode(data["plaintext"]), self._wrapped(data["ciphertext"])

    def wrap(self, plaintext: bytes, context: bytes) -> WrappedKey:
        data = self._call("POST", f"encrypt/{self.kek_name}", self._payload(plaintext, context))
        return self._wrapped(data["ciphertext"])

    def unwrap(self, wrapped: WrappedKey, context: bytes) -> bytes:
        body: dict[str, Any] = {"ciphertext": wrapped.ciphertext}
        if self.key_type == "aes256-gcm96":
            body["context"] = _b64(context)
        plaintext = base64.b64decode(self._call("POST", f"decrypt/{self.kek_name}", body)["plaintext"])
        dek = plaintext if self.key_type == "aes256-gcm96" else unbind(plaintext, context)
        if len(dek) != DEK_SIZE:
            raise KeyServiceError("Transit returned a key of the wrong size")
        return dek

    def rewrap(self, wrapped: WrappedKey, context: bytes) -> WrappedKey:
        result = self.rewrap_many([(wrapped, context)])[0]
        if isinstance(result, KeyServiceError):
            raise result
        return result

    def rewrap_many(self, items: list[tuple[WrappedKey, bytes]]) -> list[WrappedKey | KeyServiceError]:
        results: list[WrappedKey | KeyServiceError] = []
        for start in range(0, len(items), BATCH):
            batch = [self._rewrap_item(w, c) for w, c in items[start : start + BATCH]]
            data = self._call("POST", f"rewrap/{self.kek_name}", {"batch_input": batch})
            for item in data["batch_results"]:
                if item.get("error"):
                    results.append(KeyServiceError(f"Transit could not rewrap: {item['error']}"))
                else:
                    results.append(self._wrapped(item["ciphertext"]))
        return results

    def rotate(self) -> int:
        self._call("POST", f"keys/{self.kek_name}/rotate", {})
        return self.latest_version()

    def latest_version(self) -> int:
        return int(self._key_info()["latest_version"])

    def raise_floor(self, version: int) -> None:
        self._call("POST", f"keys/{self.kek_name}/config", {"min_decryption_version": version})

    def health(self) -> None:
        self._check_unsealed()
        self._key_info()

    def startup(self) -> list[str]:
        """Create the Transit key if it does not exist yet (with derivation for AES)."""
        self._check_unsealed()
        status, _ = self.http.request("GET", self._path(f"keys/{self.kek_name}"))
        if status == 404:
            body: dict[str, Any] = {"type": self.key_type}
            if self.key_type == "aes256-gcm96":
                body["derived"] = True
            self._call("POST", f"keys/{self.kek_name}", body)
            return [f"created Transit key {self.mount}/{self.kek_name} ({self.key_type})"]
        self._check_key(self._key_info())
        return []

    # -- plumbing ---------------------------------------------------------------

    def _check_unsealed(self) -> None:
        status, body = self.http.request("GET", "/v1/sys/health")
        if isinstance(body, dict) and body.get("sealed"):
            raise KeyServiceError("the Transit key service (OpenBao) is sealed")
        if status not in (200, 429, 472, 473):  # active, or a standby that forwards
            raise KeyServiceError(f"the Transit key service is not ready (HTTP {status})")

    def _payload(self, plaintext: bytes, context: bytes) -> dict[str, Any]:
        if self.key_type == "aes256-gcm96":
            return {"plaintext": _b64(plaintext), "context": _b64(context)}
        return {"plaintext": _b64(bind(plaintext, context))}

    def _rewrap_item(self, wrapped: WrappedKey, context: bytes) -> dict[str, str]:
        item = {"ciphertext": wrapped.ciphertext}
        if self.key_type == "aes256-gcm96":
            item["context"] = _b64(context)
        return item

    def _wrapped(self, ciphertext: str) -> WrappedKey:
        return WrappedKey(self.service_id, self.kek_name, _version_of(ciphertext), self.algorithm, ciphertext)

    def _key_info(self) -> dict[str, Any]:
        return self._call("GET", f"keys/{self.kek_name}", None)

    def _check_key(self, info: dict[str, Any]) -> None:
        if info.get("type") != self.key_type:
            raise KeyServiceError(f"Transit key {self.kek_name} is {info.get('type')}, configured {self.key_type}")
        if self.key_type == "aes256-gcm96" and not info.get("derived"):
            raise KeyServiceError(f"Transit key {self.kek_name} must be created with derived=true (per-user binding)")

    def _path(self, path: str) -> str:
        return f"/v1/{self.mount}/{path}"

    def _call(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        status, answer = self.http.request(method, self._path(path), body)
        errors = answer.get("errors") if isinstance(answer, dict) else None
        if status == 403:
            raise KeyServiceError("the Transit key service denied permission (check the token and its policy)")
        if status == 503:
            raise KeyServiceError("the Transit key service (OpenBao) is sealed or unavailable")
        if status == 404 and not errors:
            raise KeyServiceError(f"Transit key {self.mount}/{self.kek_name} does not exist")
        if status >= 400 or not isinstance(answer, dict):
            detail = errors[0] if errors else f"HTTP {status}"
            raise KeyServiceError(f"the Transit key service refused the request: {detail}")
        return answer.get("data") or {}
