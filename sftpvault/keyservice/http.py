"""JSON over HTTP for remote key services: timeouts, a small bounded retry with
backoff on connection failures and 5xx answers, and errors that name the cause
(never the token)."""

from __future__ import annotations

import logging
import time
from typing import Any

import requests

from sftpvault.errors import KeyServiceError

log = logging.getLogger("sftpvault.keys")


class JsonClient:
    def __init__(
        self, base_url: str, label: str, headers: dict[str, str], timeout: float, retries: int, ca_file: str = ""
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.label = label
        self.timeout = timeout
        self.retries = retries
        self.session = requests.Session()
        self.session.headers.update(headers)
        if ca_file:
            self.session.verify = ca_file

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        """(HTTP status, decoded JSON or None); KeyServiceError once retries are spent."""
        url = f"{self.base_url}{path}"
        for attempt in range(self.retries + 1):
            try:
                response = self.session.request(method, url, json=body, timeout=self.timeout)
            except requests.RequestException as exc:
                failure = f"cannot reach the {self.label} at {self.base_url}: {exc.__class__.__name__}"
            else:
                if response.status_code < 500 or attempt == self.retries:
                    try:
                        return response.status_code, response.json() if response.content else None
                    except ValueError:
                        return response.status_code, None
                failure = f"the {self.label} answered HTTP {response.status_code}"
            if attempt < self.retries:
                log.warning("%s; retrying", failure)
                time.sleep(0.2 * 2**attempt)
        raise KeyServiceError(failure)
