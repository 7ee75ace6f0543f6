"""A provisioning folder: the CA, the broker's files and one folder per identity, kept consistent.

Layout (``megace provision`` manages it; keep it on the operator's machine, ``ca/`` offline)::

    registry.json                 hosts, ports and every identity ever issued (revoked ones stay, flagged)
    ca/ca.crt ca.key crl.pem      the private CA and its revocation list
    broker/                       install on the broker host (see deploy/mosquitto/megace.conf)
        ca.crt server.crt server.key crl.pem
        megace.passwd megace.acl  static set-up (password_file, acl_file)
        dynamic-security.json     dynamic-security set-up, before the broker's first start only
    identities/<username>/        install on that device / edge / cloud / dashboard host
        ca.crt client.crt client.key password
        broker.url                mutual TLS URL (certificate identity)
        broker-password.url       TLS + password URL
        broker.env                MEGACE_BROKER_* and the service's broker variable
        signing.ed25519[.pub]     payload signing key (cloud, edges, inference workers)
        grant.msgpack             an inference worker's grant from its edge's key (megace.provision.workers)

Every change rewrites the derived broker files from the registry, so they can never drift.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.address import BrokerAddress, read_secret
from megace.provision import dynsec, pki, static
from megace.provision.identity import Identity, Role

ADMIN = Identity(Role.ADMIN, "broker")
MTLS_PORT = 8883
PASSWORD_PORT = 8884
SERVICE_ENV = {Role.EDGE: "MEGACE_EDGE__BROKER", Role.CLOUD: "MEGACE_CLOUD__BROKER"}


@dataclass
class Entry:
    """One issued identity as the registry remembers it (no secrets: the hash, the certificate serial)."""

    identity: Identity
    password_hash: str | None = None
    serial: int | None = None
    revoked: bool = False

    def to_json(self) -> dict[str, Any]:
        i = self.identity
        return {"role": i.role.value, "name": i.name, "site": i.site, "password_hash": self.password_hash,
                "serial": self.serial, "revoked": self.revoked}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Entry:
        return cls(Identity(Role(d["role"]), d["name"], d.get("site")), d.get("password_hash"), d.get("serial"),
                   bool(d.get("revoked")))


@dataclass
class Store:
    """The provisioning folder ``root``; :meth:`init` once, then :meth:`add` / :meth:`revoke`."""

    root: Path
    hosts: list[str] = field(default_factory=list)
    mtls_port: int = MTLS_PORT
    password_port: int = PASSWORD_PORT
    entries: dict[str, Entry] = field(default_factory=dict)

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"

    @property
    def admin_username(self) -> str:
        return ADMIN.username

    def identity_dir(self, username: str) -> Path:
        return self.root / "identities" / username

    # ---------------------------------------------------------------- persistence
    @classmethod
    def open(cls, root: Path) -> Store:
        path = root / "registry.json"
        if not path.exists():
            raise FileNotFoundError(f"{root} is not a provisioning folder (run `megace provision init` first)")
        d = json.loads(path.read_text())
        entries = {u: Entry.from_json(e) for u, e in d.get("identities", {}).items()}
        return cls(root, list(d["hosts"]), int(d["mtls_port"]), int(d["password_port"]), entries)

    def save(self) -> None:
        doc = {"hosts": self.hosts, "mtls_port": self.mtls_port, "password_port": self.password_port,
               "identities": {u: e.to_json() for u, e in sorted(self.entries.items())}}
        static.write_atomic(self.root / "registry.json", json.dumps(doc, indent=1) + "\n", 0o600)

    # ---------------------------------------------------------------- operations
    @classmethod
    def init(cls, root: Path, hosts: list[str], *, mtls_port: int = MTLS_PORT,
             password_port: int = PASSWORD_PORT, ca_name: str = "megace bus CA") -> Store:
        """Create the CA, the broker's server certificate (for ``hosts`` + loopback) and the dynsec admin."""
        if (root / "registry.json").exists():
            raise FileExistsError(f"{root} is already a provisioning folder")
        names = list(dict.fromkeys([*hosts, "localhost", "127.0.0.1"]))
        store = cls(root, names, mtls_port, password_port)
        ca = pki.CertificateAuthority.create(ca_name)
        ca.save(store.ca_dir)
        key, cert = ca.issue(names[0], server_names=names)
        pki.save_pair(store.broker_dir, "server", key, cert)
        store.add(ADMIN, cert=False)
        return store

    def ca(self) -> pki.CertificateAuthority:
        return pki.CertificateAuthority.load(self.ca_dir)

    def add(self, ident: Identity, *, cert: bool = True, password: bool = True,
            signing_key: bool = False) -> Path:
        """Issue credentials for ``ident``, write its folder and the broker's files; returns its folder.

        Re-adding an active identity rotates its credentials (new key, certificate and password);
        the old certificate is revoked.
        """
        old = self.entries.get(ident.username)
        if old is not None and old.identity != ident:
            raise ValueError(f"{ident.username} already names {old.identity}; device ids are unique per broker")
        folder = self.identity_dir(ident.username)
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        entry = Entry(ident)
        if cert:
            key, crt = self.ca().issue(ident.username)
            pki.save_pair(folder, "client", key, crt)
            entry.serial = crt.serial_number
        if password:
            secret = static.new_password()
            pki.write_private(folder / "password", (secret + "\n").encode())
            entry.password_hash = static.hash_password(secret)
        if old is not None and old.serial is not None and old.serial != entry.serial:
            self._retire_serial(old.serial)
        if signing_key:
            pki.signing_keypair(folder)
        shutil.copyfile(self.ca_dir / "ca.crt", folder / "ca.crt")
        self.entries[ident.username] = entry
        self._write_snippets(entry, folder)
        self.save()
        self.write_broker_files()
        return folder

    def revoke(self, username: str) -> Identity:
        """Remove ``username`` from the password and ACL files and put its certificate on the CRL."""
        entry = self.entries.get(username)
        if entry is None:
            raise KeyError(f"no identity {username!r} in {self.root}")
        entry.revoked = True
        self.save()
        self.write_broker_files()
        return entry.identity

    def active(self) -> list[Identity]:
        """Identities with broker access (not revoked), the dynsec admin excluded."""
        return [e.identity for e in self.entries.values() if not e.revoked and e.identity.role is not Role.ADMIN]

    # ---------------------------------------------------------------- derived files
    def _retire_serial(self, serial: int) -> None:
        """Keep a replaced certificate on the CRL (its identity stays active with a new one)."""
        path = self.ca_dir / "retired-serials.json"
        retired = json.loads(path.read_text()) if path.exists() else []
        static.write_atomic(path, json.dumps(sorted({*retired, serial})) + "\n")

    def revoked_serials(self) -> list[int]:
        path = self.ca_dir / "retired-serials.json"
        retired = json.loads(path.read_text()) if path.exists() else []
        return sorted({*retired, *(e.serial for e in self.entries.values() if e.revoked and e.serial is not None)})

    def write_broker_files(self) -> None:
        """Password file, ACL file, CRL and the dynsec initial file, all from the registry."""
        b = self.broker_dir
        members = {e.identity: e.password_hash for e in self.entries.values()
                   if not e.revoked and e.identity.role is not Role.ADMIN}
        static.write_atomic(b / "megace.passwd", static.render_password_file(
            {i.username: h for i, h in members.items() if h}), 0o640)
        static.write_atomic(b / "megace.acl", static.render_acl_file(members))
        crl = self.ca().crl(self.revoked_serials())
        pki.save_crl(self.ca_dir / "crl.pem", crl)
        pki.save_crl(b / "crl.pem", crl)
        shutil.copyfile(self.ca_dir / "ca.crt", b / "ca.crt")
        admin = self.entries.get(ADMIN.username)
        if admin is not None and admin.password_hash:
            # dynsec needs a hash for each client; certificate-only identities get an unusable one
            hashed = {i: h or static.hash_password(static.new_password()) for i, h in members.items()}
            static.write_atomic(b / "dynamic-security.json", dynsec.initial_config(ADMIN, admin.password_hash, hashed),
                                0o600)

    def address(self, username: str, *, mtls: bool = True, host: str | None = None,
                files_at: Path | None = None) -> BrokerAddress:
        """How ``username`` reaches the broker (``files_at``: where its folder is installed on its host)."""
        folder = files_at or self.identity_dir(username).resolve()
        ca = str(folder / "ca.crt")
        host = host or self.hosts[0]
        if mtls:
            return BrokerAddress(host, self.mtls_port, True, ca, username,
                                 cert_file=str(folder / "client.crt"), key_file=str(folder / "client.key"))
        pw_file = self.identity_dir(username) / "password"
        return BrokerAddress(host, self.password_port, True, ca, username, read_secret(pw_file),
                             password_file=str(folder / "password"))

    def _write_snippets(self, entry: Entry, folder: Path) -> None:
        u = entry.identity.username
        urls: dict[str, str] = {}
        if entry.serial is not None:
            urls["broker.url"] = self.address(u).url()
        if entry.password_hash is not None:
            urls["broker-password.url"] = self.address(u, mtls=False).url()
        for name, url in urls.items():
            (folder / name).write_text(url + "\n")
        main = urls.get("broker.url") or urls.get("broker-password.url", "")
        a = BrokerAddress.from_url(main, env={})
        env = [f"# broker settings for {entry.identity}; the password itself stays in {folder / 'password'}",
               f"MEGACE_BROKER_USERNAME={u}", f"MEGACE_BROKER_CA={a.ca_file}"]
        if a.cert_file:
            env += [f"MEGACE_BROKER_CERT={a.cert_file}", f"MEGACE_BROKER_KEY={a.key_file}"]
        elif entry.password_hash is not None:
            env.append(f"MEGACE_BROKER_PASSWORD_FILE={a.password_file}")
        if entry.identity.role in SERVICE_ENV:
            env.append(f"{SERVICE_ENV[entry.identity.role]}={main}")
        (folder / "broker.env").write_text("\n".join(env) + "\n")
