"""A throwaway slapd on loopback with its own cn=config and database (Debian's slapd)."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import free_port

SUFFIX = "dc=example,dc=org"
ADMIN_DN = f"cn=admin,{SUFFIX}"
SCHEMA = Path(__file__).resolve().parent / "ldap" / "openssh-lpk.ldif"


@dataclass
class Slapd:
    url: str
    proc: subprocess.Popen
    admin_password: str
    ldaps_url: str = ""
    ca_file: str = ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def make_tls_files(base: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 (ca.pem, server.pem, server.key)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sftpvault test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = base / "ca.pem", base / "server.pem", base / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


def config_ldif(base: Path, admin_password: str) -> str:
    ca, cert, key = make_tls_files(base)
    includes = "".join(
        f"include: file:///etc/ldap/schema/{n}.ldif\n" for n in ("core", "cosine", "nis", "inetorgperson")
    )
    return f"""dn: cn=config
objectClass: olcGlobal
cn: config
olcPidFile: {base}/slapd.pid
olcTLSCACertificateFile: {ca}
olcTLSCertificateFile: {cert}
olcTLSCertificateKeyFile: {key}

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
    port, tls_port = free_port(), free_port()
    url, ldaps_url = f"ldap://127.0.0.1:{port}", f"ldaps://127.0.0.1:{tls_port}"
    proc = subprocess.Popen(
        ["slapd", "-d", "0", "-h", f"{url}/ {ldaps_url}/", "-F", str(base / "slapd.d")],
        stdout=subprocess.DEVNULL,
        stderr=(base / "slapd.log").open("wb"),
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError((base / "slapd.log").read_text())
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return Slapd(url, proc, admin_password, ldaps_url, str(base / "ca.pem"))
        except OSError:
            time.sleep(0.05)
    proc.terminate()
    raise AssertionError("slapd did not start")
