"""Where a broker is and how to log in: one dataclass shared by the SDK, agents and the CLI.

Credentials come from the URL (``mqtts://user@host:8883?ca=..&cert=..&key=..&password_file=..``)
or the environment (``MEGACE_BROKER_USERNAME``, ``MEGACE_BROKER_PASSWORD``,
``MEGACE_BROKER_PASSWORD_FILE``, ``MEGACE_BROKER_CA``, ``MEGACE_BROKER_CERT``, ``MEGACE_BROKER_KEY``);
what the URL says wins. The password never appears in ``str()``/``repr()``, so an address can be
logged as is.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlparse

from broker.compat import slotted_dataclass

log = logging.getLogger(__name__)

ENV_PREFIX = "MEGACE_BROKER_"
#: query parameter -> field; the aliases accept the spellings of mosquitto's own tools
_QUERY = {
    "ca": "ca_file", "ca_file": "ca_file", "cafile": "ca_file",
    "cert": "cert_file", "cert_file": "cert_file", "certfile": "cert_file",
    "key": "key_file", "key_file": "key_file", "keyfile": "key_file",
    "password_file": "password_file",
    "keepalive": "keepalive",
}
_ENV = {"CA": "ca_file", "CERT": "cert_file", "KEY": "key_file", "USERNAME": "username",
        "PASSWORD_FILE": "password_file", "PASSWORD": "password"}  # a file beats a variable (rotation, ps)


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

    @classmethod
    def from_url(cls, url: str, env: Mapping[str, str] | None = None) -> BrokerAddress:
        """Parse ``mqtt[s]://[user[:pass]@]host[:port][?ca=&cert=&key=&password_file=&keepalive=]``.

        Missing settings are taken from ``MEGACE_BROKER_*`` in ``env`` (default ``os.environ``);
        a password (from the env) is only used with a user name. A password in the URL itself
        still works, but a ``password_file`` keeps it out of configs and process listings.
        """
        env = os.environ if env is None else env
        u = urlparse(url if "://" in url else f"mqtt://{url}")
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
        except ValueError as exc:
            raise ValueError(f"bad broker URL {cls._redact(url)!r}: {exc}") from None
        return cls(host=host, port=port, tls=tls, keepalive=keepalive, **opts)  # type: ignore[arg-type]

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

    def url(self, *, with_password: bool = False) -> str:
        """This address as a URL that :meth:`from_url` reads back (for child processes and configs).

        The password is left out unless ``with_password``; a ``password_file`` is named instead.
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
        tail = f"?{urlencode(query, safe='/')}" if query else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{auth}{self.host}:{self.port}{tail}"

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def __repr__(self) -> str:
        secret = "'***'" if self.password else "None"
        return (f"BrokerAddress(host={self.host!r}, port={self.port}, tls={self.tls}, ca_file={self.ca_file!r}, "
                f"username={self.username!r}, password={secret}, keepalive={self.keepalive}, "
                f"cert_file={self.cert_file!r}, key_file={self.key_file!r}, password_file={self.password_file!r})")
