"""LDAP authentication with ldap3: bind as the user to check the password.

The user's DN comes from a template (`uid={user},ou=people,dc=example,dc=org`)
or from a search with a service account (user input escaped with ldap3's
filter escaping). Optionally only members of one group may log in, and SSH
public keys are read from the user's `sshPublicKey` attribute (openssh-lpk),
so batch users can be managed entirely in the directory. A slow or dead
server costs at most the timeout; the login is then refused and logged.
"""

from __future__ import annotations

import logging
import math
import ssl
import threading
from dataclasses import dataclass
from urllib.parse import urlparse

import ldap3
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn

from sftpvault.auth.base import AuthBackend, acceptable_password
from sftpvault.auth.embedded import USER_NAME
from sftpvault.auth.keys import AuthorizedKey, parse_authorized_key
from sftpvault.config import LdapSettings
from sftpvault.errors import ConfigError, UserError

log = logging.getLogger("sftpvault.auth")


@dataclass(frozen=True)
class LdapUser:
    dn: str
    keys: tuple[str, ...]
    area: str | None


class LdapBackend(AuthBackend):
    name = "ldap"

    def __init__(self, options: LdapSettings, bind_password: str = "") -> None:
        if not options.user_dn_template and not options.search_base:
            raise ConfigError("ldap: set user_dn_template or search_base")
        self.options = options
        self.bind_password = bind_password
        parsed = urlparse(options.url)
        if parsed.scheme not in ("ldap", "ldaps") or not parsed.hostname:
            raise ConfigError(f"ldap.url must be ldap://host[:port] or ldaps://host[:port], not {options.url!r}")
        tls = ldap3.Tls(ca_certs_file=options.ca_file or None, validate=ssl.CERT_REQUIRED)
        self.timeout = max(1, math.ceil(options.timeout))  # ldap3 packs timeouts into socket options as ints
        self.server = ldap3.Server(
            parsed.hostname,
            port=parsed.port,
            use_ssl=parsed.scheme == "ldaps",
            tls=tls,
            connect_timeout=self.timeout,
            get_info=ldap3.NONE,
        )
        self._service: ldap3.Connection | None = None
        self._lock = threading.Lock()

    # -- AuthBackend -----------------------------------------------------------

    def check_password(self, user: str, password: str) -> bool:
        if not acceptable_password(password):
            return False
        try:
            found = self._find(user)
            if found is None:
                return False
            connection = self._connection(found.dn, password)
            try:
                return bool(connection.bind())
            finally:
                connection.unbind()
        except LDAPException as exc:
            log.warning("ldap: cannot check %r (%s): login refused", user, exc.__class__.__name__)
            return False

    def authorized_keys(self, user: str) -> list[AuthorizedKey]:
        try:
            found = self._find(user)
        except LDAPException as exc:
            log.warning("ldap: cannot read keys of %r (%s): login refused", user, exc.__class__.__name__)
            return []
        keys = []
        for line in found.keys if found else ():
            try:
                keys.append(parse_authorized_key(line))
            except UserError as exc:
                log.warning("ldap: ignoring a key of %r: %s", user, exc)
        return keys

    def area(self, user: str) -> str | None:
        if not self.options.area_attribute:
            return None
        found = self._find(user)
        return found.area if found else None

    # -- directory -------------------------------------------------------------

    def _connection(self, dn: str, password: str) -> ldap3.Connection:
        connection = ldap3.Connection(
            self.server,
            user=dn,
            password=password,
            receive_timeout=self.timeout,
            read_only=True,
            raise_exceptions=False,
        )
        connection.open()
        if self.options.start_tls:
            connection.start_tls()
        return connection

    def _service_connection(self) -> ldap3.Connection:
        """A reused, bound connection for searches (rebuilt after a failure)."""
        if self._service is None or self._service.closed:
            connection = self._connection(self.options.bind_dn, self.bind_password)
            if not connection.bind():
                raise LDAPException("the service account cannot bind")
            self._service = connection
        return self._service

    def _find(self, user: str) -> LdapUser | None:
        """The user's DN, keys and area, or None if unknown or not in the required group."""
        with self._lock:
            try:
                return self._search(user)
            except LDAPException:
                if self._service is not None:
                    self._service.unbind()
                    self._service = None
                raise

    def _search(self, user: str) -> LdapUser | None:
        connection = self._service_connection()
        attributes = [a for a in (self.options.ssh_key_attribute, self.options.area_attribute) if a]
        if self.options.user_dn_template:
            dn = self.options.user_dn_template.format(user=escape_rdn(user))
            ok = connection.search(dn, "(objectClass=*)", search_scope=ldap3.BASE, attributes=attributes)
        else:
            query = self.options.search_filter.format(user=escape_filter_chars(user))
            ok = connection.search(self.options.search_base, query, attributes=attributes)
        if not ok or len(connection.entries) != 1:
            return None
        entry = connection.entries[0]
        dn = entry.entry_dn
        if self.options.required_group and not self._is_member(connection, dn, user):
            log.info("ldap: %r is not in %s", user, self.options.required_group)
            return None
        return LdapUser(
            dn, _values(entry, self.options.ssh_key_attribute), _area(_values(entry, self.options.area_attribute))
        )

    def _is_member(self, connection: ldap3.Connection, dn: str, user: str) -> bool:
        query = (
            f"(|(member={escape_filter_chars(dn)})(uniqueMember={escape_filter_chars(dn)})"
            f"(memberUid={escape_filter_chars(user)}))"
        )
        return bool(connection.search(self.options.required_group, query, search_scope=ldap3.BASE))


def _values(entry: ldap3.abstract.entry.Entry, attribute: str) -> tuple[str, ...]:
    if not attribute or attribute not in entry:
        return ()
    return tuple(v.decode() if isinstance(v, bytes) else str(v) for v in entry[attribute].values)


def _area(values: tuple[str, ...]) -> str | None:
    """The last path component of the first value (/home/alice -> alice); "" if it is no valid area name."""
    if not values:
        return None
    name = values[0].rstrip("/").rsplit("/", 1)[-1]
    return name if USER_NAME.match(name) else ""
