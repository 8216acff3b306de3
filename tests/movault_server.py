"""A small Mo-Vault EaaS server for tests: no real one can run here (it is the
original dropzone's private service), so this implements its API as the
design describes it, with RSA-OAEP keys per (secret_path, version) and its
error shape: HTTP 200 with {"Error": ...}."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


class MoVault:
    def __init__(self) -> None:
        self.keys: dict[tuple[str, int], rsa.RSAPrivateKey] = {}
        self.calls: list[str] = []
        self.delay = 0.0  # seconds to stall every answer: a slow key service
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> MoVault:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(path)
        time.sleep(self.delay)
        secret = body.get("secret_path")
        if path == "/gen/key/rsa":
            version = 1 + max((v for (p, v) in self.keys if p == secret), default=0)
            self.keys[(secret, version)] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            return {"Info": {"secret_version": version}}
        key = self.keys.get((secret, body.get("secret_version")))
        if key is None:
            return {"Error": f"no such secret {secret} version {body.get('secret_version')}"}
        if path == "/key/encrypt/rsa":
            return {"Info": key.public_key().encrypt(str(body["plaintext"]).encode(), OAEP).hex()}
        if path == "/key/decrypt/rsa":
            try:
                return {"Info": key.decrypt(bytes.fromhex(body["ciphertext"]), OAEP).decode()}
            except ValueError:
                return {"Error": "decryption failed"}
        return {"Error": f"unknown endpoint {path}"}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        movault = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                reply = json.dumps(movault.answer(self.path, json.loads(self.rfile.read(length) or b"{}"))).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler
