"""A throwaway slapd on loopback with its own cn=config and database (Debian's slapd)."""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port

SUFFIX = "dc=example,dc=org"
ADMIN_DN = f"cn=admin,{SUFFIX}"
SCHEMA = Path(__file__).resolve().parent / "ldap" / "openssh-lpk.ldif"


@dataclass
class Slapd:
    url: str
    proc: subprocess.Popen
    admin_password: str

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def config_ldif(base: Path, admin_password: str) -> str:
    includes = "".join(
        f"include: file:///etc/ldap/schema/{n}.ldif\n" for n in ("core", "cosine", "nis", "inetorgperson")
    )
    return f"""dn: cn=config
objectClass: olcGlobal
cn: config
olcPidFile: {base}/slapd.pid

dn: cn=module{{0}},cn=config
objectClass: olcModuleList
cn: module{{0}}
olcModulePath: /usr/lib/ldap
olcModuleLoad: back_mdb

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

{includes}include: file://{SCHEMA}

dn: olcDatabase={{1}}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {{1}}mdb
olcSuffix: {SUFFIX}
olcDbDirectory: {base}/db
olcRootDN: {ADMIN_DN}
olcRootPW: {admin_password}
olcAccess: {{0}}to attrs=userPassword by self read by anonymous auth by * none
olcAccess: {{1}}to * by users read by * none
"""


def start_slapd(base: Path, data_ldif: str, admin_password: str = "admin-secret") -> Slapd:
    (base / "slapd.d").mkdir(parents=True)
    (base / "db").mkdir()
    (base / "config.ldif").write_text(config_ldif(base, admin_password))
    (base / "data.ldif").write_text(data_ldif)
    for number, ldif in (("0", "config.ldif"), ("1", "data.ldif")):
        subprocess.run(
            ["slapadd", "-q", "-n", number, "-F", str(base / "slapd.d"), "-l", str(base / ldif)],
            check=True,
            capture_output=True,
        )
    port = free_port()
    url = f"ldap://127.0.0.1:{port}"
    proc = subprocess.Popen(
        ["slapd", "-d", "0", "-h", f"{url}/", "-F", str(base / "slapd.d")],
        stdout=subprocess.DEVNULL,
        stderr=(base / "slapd.log").open("wb"),
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError((base / "slapd.log").read_text())
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return Slapd(url, proc, admin_password)
        except OSError:
            time.sleep(0.05)
    proc.terminate()
    raise AssertionError("slapd did not start")
