"""LDAP authentication against a real slapd on loopback."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from sftpvault.auth.ldap import LdapBackend
from sftpvault.config import LdapSettings
from tests.conftest import Vault, make_vault
from tests.slapd import ADMIN_DN, SUFFIX, Slapd, start_slapd

PASSWORDS = {
    "alice": "alice-pass-1",
    "bob": "bob-pass-2",
    "carol": "carol-pass-3",
    "dave": "dave-pass-4",
    "svc": "service-pass",
}
DEPARTMENTS = {"alice": "finance", "carol": "finance", "dave": "Bad Area!"}


def data_ldif(carol_key: str) -> str:
    people = f"ou=people,{SUFFIX}"
    entries = [
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example\n",
        f"dn: {people}\nobjectClass: organizationalUnit\nou: people\n",
        f"dn: ou=groups,{SUFFIX}\nobjectClass: organizationalUnit\nou: groups\n",
    ]
    for number, (uid, password) in enumerate(PASSWORDS.items()):
        extra = f"objectClass: ldapPublicKey\nsshPublicKey: {carol_key}\n" if uid == "carol" else ""
        extra += f"departmentNumber: {DEPARTMENTS[uid]}\n" if uid in DEPARTMENTS else ""
        entries.append(
            f"dn: uid={uid},{people}\nobjectClass: inetOrgPerson\nobjectClass: posixAccount\n{extra}"
            f"uid: {uid}\ncn: {uid}\nsn: {uid}\nuidNumber: {2000 + number}\ngidNumber: 2000\n"
            f"homeDirectory: /home/{uid}\nuserPassword: {password}\n"
        )
    members = "".join(f"member: uid={u},{people}\n" for u in ("alice", "carol", "dave"))
    entries.append(f"dn: cn=sftpusers,ou=groups,{SUFFIX}\nobjectClass: groupOfNames\ncn: sftpusers\n{members}")
    return "\n".join(entries)


@pytest.fixture
def slapd(tmp_path: Path, client_key: Path) -> Iterator[Slapd]:
    server = start_slapd(tmp_path / "slapd", data_ldif(Path(f"{client_key}.pub").read_text().strip()))
    yield server
    server.stop()


def ldap_config(slapd: Slapd, home: Path) -> str:
    (home / "ldap-bind").write_text(PASSWORDS["svc"] + "\n")
    return (
        f'[auth]\nbackends = ["ldap", "embedded"]\n[ldap]\nurl = "{slapd.url}"\n'
        f'search_base = "ou=people,{SUFFIX}"\nbind_dn = "uid=svc,ou=people,{SUFFIX}"\n'
        f'bind_password_file = "{home / "ldap-bind"}"\nrequired_group = "cn=sftpusers,ou=groups,{SUFFIX}"\n'
        f"timeout = 2.0\n"
    )


@pytest.fixture
def ldap_vault(slapd: Slapd, template_home: Path, client_key: Path, tmp_path: Path) -> Iterator[Vault]:
    vault = make_vault(template_home, client_key, tmp_path)
    (vault.home / "sftpvault.toml").write_text(ldap_config(slapd, vault.home))
    vault.start()
    yield vault
    if vault.proc is not None:
        vault.stop()


def password_login(vault: Vault, user: str, password: str) -> bool:
    transport = paramiko.Transport(("127.0.0.1", vault.port))
    try:
        transport.connect(username=user, password=password)
        return transport.is_authenticated()
    except paramiko.AuthenticationException:
        return False
    finally:
        transport.close()


def test_ldap_passwords(ldap_vault: Vault) -> None:
    assert password_login(ldap_vault, "alice", PASSWORDS["alice"])
    assert not password_login(ldap_vault, "alice", "wrong")
    assert not password_login(ldap_vault, "bob", PASSWORDS["bob"])  # not in the required group
    assert not password_login(ldap_vault, "nobody", "x")
    assert password_login(ldap_vault, "demo", "correct horse battery staple")  # the chain reaches the embedded store


@pytest.mark.parametrize("password", ["", " ", "\t", "alice-pass-1\x00"])
def test_empty_blank_and_nul_passwords_never_bind(ldap_vault: Vault, password: str) -> None:
    assert not password_login(ldap_vault, "alice", password)


@pytest.mark.parametrize("user", ["*", "*)(uid=*", "alice)(|(uid=*", "al*", "alice\\2a", "uid=alice,ou=people"])
def test_filter_injection_in_user_names(ldap_vault: Vault, user: str) -> None:
    for password in (PASSWORDS["alice"], "x"):
        assert not password_login(ldap_vault, user, password)


def test_ssh_key_from_ldap_with_openssh(ldap_vault: Vault) -> None:
    (ldap_vault.work / "f").write_bytes(b"carol's upload")
    ldap_vault.sftp("put f", "get f back", user="carol")
    assert (ldap_vault.work / "back").read_bytes() == b"carol's upload"
    assert (ldap_vault.home / "data" / "carol" / "f").exists()
    assert ldap_vault.sftp("pwd", user="alice", check=False).returncode != 0  # alice has no key in LDAP


def test_ldap_password_with_openssh(ldap_vault: Vault) -> None:
    out = ldap_vault.sftp_with_password("alice", PASSWORDS["alice"], "pwd\nbye\n")
    assert out.returncode == 0 and "Remote working directory: /" in out.stdout


def test_ldap_stopped_mid_run(ldap_vault: Vault, slapd: Slapd) -> None:
    assert password_login(ldap_vault, "alice", PASSWORDS["alice"])
    slapd.stop()
    started = time.monotonic()
    assert not password_login(ldap_vault, "alice", PASSWORDS["alice"])
    assert time.monotonic() - started < 60  # bounded by the timeout, not hung
    assert "ldap: cannot check 'alice'" in ldap_vault.log.read_text()
    assert password_login(ldap_vault, "demo", "correct horse battery staple")  # the listener still serves


def test_dn_template_mode(slapd: Slapd) -> None:
    settings = LdapSettings(url=slapd.url, user_dn_template=f"uid={{user}},ou=people,{SUFFIX}", bind_dn=ADMIN_DN)
    backend = LdapBackend(settings, slapd.admin_password)
    assert backend.check_password("alice", PASSWORDS["alice"])
    assert backend.check_password("bob", PASSWORDS["bob"])  # no group required here
    assert not backend.check_password("alice", PASSWORDS["bob"])
    assert not backend.check_password("alice,ou=people", PASSWORDS["alice"])
    assert [k.line.split()[0] for k in backend.authorized_keys("carol")] == ["ssh-ed25519"]


def test_ldaps_and_starttls_verify_the_server(slapd: Slapd, tmp_path: Path) -> None:
    template = f"uid={{user}},ou=people,{SUFFIX}"
    for url, start_tls in ((slapd.ldaps_url, False), (slapd.url, True)):
        trusted = LdapSettings(
            url=url, start_tls=start_tls, ca_file=slapd.ca_file, user_dn_template=template, bind_dn=ADMIN_DN
        )
        assert LdapBackend(trusted, slapd.admin_password).check_password("alice", PASSWORDS["alice"]), url
        from tests.slapd import make_tls_files

        other_dir = tmp_path / f"other-{start_tls}"
        other_dir.mkdir()
        other_ca = str(make_tls_files(other_dir)[0])  # a CA that did not sign the server's certificate
        untrusted = LdapSettings(
            url=url, start_tls=start_tls, ca_file=other_ca, user_dn_template=template, bind_dn=ADMIN_DN
        )
        assert not LdapBackend(untrusted, slapd.admin_password).check_password("alice", PASSWORDS["alice"]), url


def test_area_attribute_names_a_shared_area(
    slapd: Slapd, template_home: Path, client_key: Path, tmp_path: Path
) -> None:
    vault = make_vault(template_home, client_key, tmp_path)
    (vault.home / "sftpvault.toml").write_text(ldap_config(slapd, vault.home) + 'area_attribute = "departmentNumber"\n')
    vault.start()
    try:
        (vault.work / "report").write_bytes(b"quarterly numbers")
        vault.sftp("put report", user="carol")  # carol: key from LDAP
        assert (vault.home / "data" / "finance" / "report").exists()
        assert not (vault.home / "data" / "carol").exists()
        out = vault.sftp_with_password("alice", PASSWORDS["alice"], "get report got\nbye\n")
        assert out.returncode == 0, out.stderr
        assert (vault.work / "got").read_bytes() == b"quarterly numbers"
        out = vault.sftp_with_password("dave", PASSWORDS["dave"], "pwd\nbye\n")  # "Bad Area!" names no area
        assert out.returncode != 0 and "names no valid area" in out.stderr
        assert "names no valid area for 'dave'" in vault.log.read_text()
        assert sorted(p.name for p in (vault.home / "data").iterdir()) == ["demo", "finance"]
    finally:
        vault.stop()
