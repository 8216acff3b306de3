"""PAM authentication (python-pam): the password goes through the PAM
conversation, then `pam_acct_mgmt` refuses expired and locked accounts.

Install a service file, e.g. /etc/pam.d/sftpvault:

    auth     required  pam_unix.so
    account  required  pam_unix.so
"""

from __future__ import annotations

import logging
import threading

import pam

from sftpvault.auth.base import AuthBackend, acceptable_password

log = logging.getLogger("sftpvault.auth")


class PamBackend(AuthBackend):
    name = "pam"

    def __init__(self, service: str = "sftpvault") -> None:
        self.service = service
        self._local = threading.local()  # a PAM handle object is not shared between threads

    def check_password(self, user: str, password: str) -> bool:
        if not acceptable_password(password):
            return False
        checker = getattr(self._local, "pam", None) or pam.PamAuthenticator()
        self._local.pam = checker
        ok = bool(checker.authenticate(user, password, service=self.service, resetcreds=False))
        if not ok:
            log.info("pam: %r refused by service %s: %s", user, self.service, checker.reason)
        return ok
