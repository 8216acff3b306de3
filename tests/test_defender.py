"""The defender: penalties, bans that expire, and the unauthenticated-connection cap.

Sources other than 127.0.0.1 are other loopback addresses (127.0.0.2, ...)."""

from __future__ import annotations

import socket
import time

import paramiko
import pytest

from sftpvault.auth.defender import Defender
from sftpvault.config import DefenderSettings
from tests.conftest import PASSWORD, Vault
from tests.test_transit import wait_for


def test_penalties_ban_and_expire_with_a_clock() -> None:
    now = [1000.0]
    defender = Defender(DefenderSettings(threshold=3, ban_seconds=10, decay_seconds=1000), clock=lambda: now[0])
    assert defender.admit("10.0.0.1") is None
    for _ in range(3):
        defender.penalise("10.0.0.1", "authfail")
    assert "banned" in defender.admit("10.0.0.1")
    assert defender.admit("10.0.0.2") is None  # another source is unaffected
    now[0] += 11
    assert defender.admit("10.0.0.1") is None  # the ban expired
    for _ in range(3):
        defender.penalise("10.0.0.1", "authfail")
    now[0] += 11
    assert "banned" in defender.admit("10.0.0.1")  # a repeat offender is banned for longer (20 s)
    now[0] += 10
    assert defender.admit("10.0.0.1") is None


def test_points_expire() -> None:
    now = [0.0]
    defender = Defender(DefenderSettings(threshold=3, decay_seconds=10), clock=lambda: now[0])
    defender.penalise("a", "authfail")
    defender.penalise("a", "authfail")
    now[0] += 30  # both points have expired
    defender.penalise("a", "authfail")
    assert defender.admit("a") is None
    now[0] += 0.5
    defender.penalise("a", "noauth")
    now[0] += 0.5
    defender.penalise("a", "authfail")  # three points within the window, earned at different moments
    assert "banned" in defender.admit("a")


def connect_from(vault: Vault, source: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", vault.port), timeout=10, source_address=(source, 0))


def password_attempt(vault: Vault, source: str, password: str, user: str = "demo") -> bool:
    transport = paramiko.Transport(connect_from(vault, source))
    try:
        transport.connect(username=user, password=password)
        return True
    except paramiko.AuthenticationException:
        return False
    finally:
        transport.close()


def restart_with(vault: Vault, config: str) -> None:
    (vault.home / "sftpvault.toml").write_text(config)
    vault.stop()
    vault.start()


def test_a_failing_source_is_banned_others_are_not_and_the_ban_expires(vault: Vault) -> None:
    restart_with(vault, "[defender]\nthreshold = 3.0\nban_seconds = 3.0\nfailed_auth_delay = 0.05\n")
    for _ in range(3):
        assert not password_attempt(vault, "127.0.0.2", "wrong guess")
    wait_for(lambda: "defender: banned 127.0.0.2" in vault.log.read_text())  # penalties land as connections end
    with pytest.raises((paramiko.SSHException, EOFError, OSError)):
        password_attempt(vault, "127.0.0.2", PASSWORD)  # refused at connect, even with the right password
    assert password_attempt(vault, "127.0.0.1", PASSWORD)
    assert "defender: banned 127.0.0.2" in vault.log.read_text()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if password_attempt(vault, "127.0.0.2", PASSWORD):
                break
        except (paramiko.SSHException, EOFError, OSError):
            time.sleep(0.5)
    else:
        pytest.fail("the ban did not expire")


def test_idle_connections_from_one_source_cannot_lock_out_others(vault: Vault) -> None:
    restart_with(vault, "[defender]\nmax_unauthenticated_per_source = 5\n")
    idle = []
    for _ in range(40):
        s = connect_from(vault, "127.0.0.3")
        idle.append(s)
    served = 0
    for s in idle:
        try:
            served += s.recv(64).startswith(b"SSH-")
        except OSError:
            pass
    assert served <= 5
    assert password_attempt(vault, "127.0.0.1", PASSWORD)  # a real user still gets in
    for s in idle:
        s.close()
    assert "too many unauthenticated connections from this source" in vault.log.read_text()


def test_failed_logins_take_the_floor_time_for_known_and_unknown_users(vault: Vault) -> None:
    for user in ("demo", "no-such-user"):
        transport = paramiko.Transport(("127.0.0.1", vault.port))
        transport.start_client(timeout=10)
        started = time.monotonic()
        with pytest.raises(paramiko.AuthenticationException):
            transport.auth_password(user, "wrong")
        assert time.monotonic() - started >= 0.3, user
        transport.close()
