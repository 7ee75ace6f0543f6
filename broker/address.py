"""Where a broker is and how to log in: one dataclass shared by the SDK, agents and the CLI.

Credentials come from the URL (``mqtts://user@host:8883?ca=..&cert=..&key=..&password_file=..``)
or the environment (``MEGACE_BROKER_USERNAME``, ``MEGACE_BROKER_PASSWORD``,
``MEGACE_BROKER_PASSWORD_FILE``, ``MEGACE_BROKER_CA``, ``MEGACE_BROKER_CERT``, ``MEGACE_BROKER_KEY``);
what the URL says wins. The password never appears in ``str()``/``repr()``, so an address can be
logged as is.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import ssl
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlparse

from broker.compat import slotted_dataclass
from broker.protocol import DEFAULT_PROTOCOL, DEFAULT_SESSION_EXPIRY_S, check_protocol, check_session_expiry

log = logging.getLogger(__name__)

ENV_PREFIX = "MEGACE_BROKER_"
#: query parameter -> field; the aliases accept the spellings of mosquitto's own tools
_QUERY = {
    "ca": "ca_file", "ca_file": "ca_file", "cafile": "ca_file",
    "cert": "cert_file", "cert_file": "cert_file", "certfile": "cert_file",
    "key": "key_file", "key_file": "key_file", "keyfile": "key_file",
    "password_file": "password_file",
    "keepalive": "keepalive",
    "protocol": "protocol", "session_expiry": "session_expiry",
    "timeout": "timeout",
}
_ENV = {"CA": "ca_file", "CERT": "cert_file", "KEY": "key_file", "USERNAME": "username",
        "PASSWORD_FILE": "password_file", "PASSWORD": "password",
        "PROTOCOL": "protocol", "SESSION_EXPIRY": "session_expiry"}  # a file beats a variable (rotation, ps)


def read_secret(path: str | os.PathLike[str]) -> str:
    """The first line of a secret file (a trailing newline from ``echo`` is not part of the secret)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"cannot read password file {path}: {exc.strerror}") from None
    return text.splitlines()[0] if text else ""


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@slotted_dataclass(frozen=True, repr=False)
class BrokerAddress:
    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    ca_file: str | None = None
    username: str | None = None
    password: str | None = None
    keepalive: int = 30
    cert_file: str | None = None
    """Client certificate (PEM, may hold the chain) for mutual TLS."""
    key_file: str | None = None
    """Private key of ``cert_file``; ``None`` when the key is in ``cert_file``."""
    password_file: str | None = None
    """Where ``password`` was read from (kept so :meth:`url` can name the file, not the secret)."""
    timeout: float = 10.0
    """Seconds the services wait for a CONNACK or SUBACK (aiomqtt's default is 10). A NATS cluster makes a
    replicated JetStream consumer per QoS 1 subscription of a persistent session: an edge's 36 took 14 s on
    this machine under load, and a client that gives up first retries forever. Give it ``?timeout=60``."""
    alternates: tuple[tuple[str, int], ...] = ()
    """Further nodes of the same (clustered) broker, ``mqtt://h1:1883,h2:1883``: clients move to the next
    one when a connection fails or is lost (same credentials and TLS settings for all)."""
    protocol: str = DEFAULT_PROTOCOL
    """MQTT version: ``auto`` (5, falling back to 3.1.1), ``5`` or ``3.1.1`` (see :mod:`broker.protocol`)."""
    session_expiry: int = DEFAULT_SESSION_EXPIRY_S
    """MQTT 5: seconds the broker keeps a durable session after the client left (3.1.1: forever)."""

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        """Every ``(host, port)`` this address names, the first one first."""
        return [(self.host, self.port), *self.alternates]

    def endpoint(self, i: int) -> BrokerAddress:
        """The address of endpoint ``i`` (modulo their number) alone: what one connection attempt uses."""
        if not self.alternates:
            return self
        host, port = self.endpoints[i % len(self.endpoints)]
        return dataclasses.replace(self, host=host, port=port, alternates=())

    @property
    def identified(self) -> bool:
        """Logs in as an identity (a username or a client certificate): on a broker that makes the username the
        client id (megace's secure set-up), a second connection with the same login takes this one's session."""
        return bool(self.username or self.cert_file)

    def logged_in_as(self, folder: str | os.PathLike[str]) -> BrokerAddress:
        """The same broker, logging in as the identity whose files ``megace provision`` wrote to ``folder``
        (its name is the username): with its certificate where this address uses one (mutual TLS), else with
        its password. Unreadable files raise ``OSError`` here, not at the first connection attempt."""
        folder = Path(folder)
        if self.cert_file:
            address = dataclasses.replace(self, username=folder.name, password=None, password_file=None,
                                          cert_file=str(folder / "client.crt"), key_file=str(folder / "client.key"))
            for path in (folder / "client.crt", folder / "client.key"):
                path.read_bytes()
            return address
        secret = folder / "password"
        return dataclasses.replace(self, username=folder.name, password=read_secret(secret),
                                   password_file=str(secret), cert_file=None, key_file=None)

    @classmethod
    def from_url(cls, url: str, env: Mapping[str, str] | None = None) -> BrokerAddress:
        """Parse ``mqtt[s]://[user[:pass]@]host[:port][?ca=&cert=&key=&password_file=&keepalive=]``.

        Missing settings are taken from ``MEGACE_BROKER_*`` in ``env`` (default ``os.environ``);
        a password (from the env) is only used with a user name. A password in the URL itself
        still works, but a ``password_file`` keeps it out of configs and process listings.
        """
        env = os.environ if env is None else env
        url, more = cls._split_hosts(url if "://" in url else f"mqtt://{url}")
        u = urlparse(url)
        if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"unsupported broker URL scheme {u.scheme!r}")
        tls = u.scheme in ("mqtts", "ssl")
        opts: dict[str, str] = {}
        for name, value in parse_qsl(u.query, keep_blank_values=True):
            if name not in _QUERY:
                raise ValueError(f"unknown broker URL parameter {name!r} (known: {', '.join(sorted(set(_QUERY)))})")
            opts[_QUERY[name]] = value
        if u.username:
            opts["username"] = unquote(u.username)
        if u.password:
            opts["password"] = unquote(u.password)
        for suffix, name in _ENV.items():
            value = env.get(ENV_PREFIX + suffix)
            if value and name not in opts and not (name == "password" and "password_file" in opts):
                opts[name] = value
        if "password_file" in opts and "password" not in opts:
            opts["password"] = read_secret(opts["password_file"])
        if "username" not in opts:
            opts.pop("password", None)
            opts.pop("password_file", None)
        if not tls and any(k in opts for k in ("ca_file", "cert_file", "key_file")):
            raise ValueError("ca/cert/key need a TLS URL (mqtts://)")
        if "key_file" in opts and "cert_file" not in opts:
            raise ValueError("a client key needs its certificate (cert=)")
        host = u.hostname or "127.0.0.1"
        if "password" in opts and not tls and not _loopback(host):
            log.warning("broker %s: password sent in clear text (use mqtts://)", host)
        try:
            port = u.port or (8883 if tls else 1883)
            keepalive = int(opts.pop("keepalive", 30))
            timeout = float(opts.pop("timeout", 10.0))
            if not timeout > 0:
                raise ValueError(f"timeout must be positive, got {timeout}")
            if "protocol" in opts:
                opts["protocol"] = check_protocol(opts["protocol"])
            if "session_expiry" in opts:
                opts["session_expiry"] = check_session_expiry(opts["session_expiry"])  # type: ignore[assignment]
        except ValueError as exc:
            raise ValueError(f"bad broker URL {cls._redact(url)!r}: {exc}") from None
        try:  # a node without a port gets the scheme's default, as the first one does
            alternates = tuple((urlparse(f"//{h}").hostname or "", urlparse(f"//{h}").port or (8883 if tls else 1883))
                               for h in more)
        except ValueError as exc:
            raise ValueError(f"bad broker host list {','.join(more)!r}: {exc}") from None
        if any(not h for h, _ in alternates):
            raise ValueError(f"bad broker host list {','.join(more)!r}: an empty host")
        return cls(host=host, port=port, tls=tls, keepalive=keepalive, timeout=timeout,  # type: ignore[arg-type]
                   alternates=alternates, **opts)

    @staticmethod
    def _split_hosts(url: str) -> tuple[str, list[str]]:
        """``mqtt://u@h1:1,h2:2?q`` -> (``mqtt://u@h1:1?q``, [``h2:2``]): urlparse reads one host only."""
        scheme, rest = url.split("://", 1)
        end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
        auth, sep, hosts = rest[:end].rpartition("@")
        first, *more = hosts.split(",")
        return f"{scheme}://{auth}{sep}{first}{rest[end:]}", [h.strip() for h in more]

    @staticmethod
    def _redact(url: str) -> str:
        u = urlparse(url if "://" in url else f"mqtt://{url}")
        if u.password:
            return url.replace(f":{u.password}@", ":***@", 1)
        return url

    def ssl_context(self) -> ssl.SSLContext | None:
        """A verifying TLS context (TLS 1.2+) with the client certificate chain loaded for mutual TLS.

        With a client certificate the context stays at TLS 1.2: in TLS 1.3 the broker judges the
        certificate after the client thinks the handshake is over, so a revoked or unknown
        certificate shows up as a timeout; in 1.2 the connect fails at once with the alert
        (``certificate revoked``, ``unknown ca``). The price: the certificate, whose CN is the
        username, crosses the network unencrypted (see docs/SECURITY.md).
        """
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=self.ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def url(self, *, with_password: bool = False, pin_protocol: bool = False) -> str:
        """This address as a URL that :meth:`from_url` reads back (for child processes and configs).

        The password is left out unless ``with_password``; a ``password_file`` is named instead.
        ``pin_protocol``: name the protocol even when it is the default, so that ``MEGACE_BROKER_PROTOCOL`` in
        the reader's environment cannot override it (a broker known to lack MQTT 5).
        """
        auth = ""
        if self.username:
            auth = quote(self.username, safe="")
            if with_password and self.password and not self.password_file:
                auth += ":" + quote(self.password, safe="")
            auth += "@"
        query = {k: v for k, v in (("ca", self.ca_file), ("cert", self.cert_file), ("key", self.key_file),
                                   ("password_file", self.password_file)) if v}
        if self.keepalive != 30:
            query["keepalive"] = str(self.keepalive)
        if self.timeout != 10.0:
            query["timeout"] = f"{self.timeout:g}"
        if self.protocol != DEFAULT_PROTOCOL or pin_protocol:
            query["protocol"] = self.protocol
        if self.session_expiry != DEFAULT_SESSION_EXPIRY_S:
            query["session_expiry"] = str(self.session_expiry)
        tail = f"?{urlencode(query, safe='/')}" if query else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{auth}{self._hosts()}{tail}"

    def _hosts(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.endpoints)

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self._hosts()}"

    def __repr__(self) -> str:
        secret = "'***'" if self.password else "None"
        return (f"BrokerAddress(host={self.host!r}, port={self.port}, tls={self.tls}, ca_file={self.ca_file!r}, "
                f"username={self.username!r}, password={secret}, keepalive={self.keepalive}, "
                f"cert_file={self.cert_file!r}, key_file={self.key_file!r}, password_file={self.password_file!r}"
                + (f", alternates={self.alternates!r})" if self.alternates else ")"))
