"""``megace run --secure``: the closed loop on a private Mosquitto with the production trust model.

One provisioning folder (a temporary one, or ``--state-dir``) holds a CA, the broker's certificate and
one identity per participant, named as everywhere else (username == client id == certificate CN):

==============================  ==================================  ======================================
identity                        connects with                       signs / verifies
==============================  ==================================  ======================================
``megace-cloud-cloud-0``        mutual TLS (its certificate)        signs globals and site feedback;
                                                                    verifies uploads against each edge's key
``megace-edge-edge-<i>``        mutual TLS                          signs uploads and device downlinks;
                                                                    verifies globals/feedback (cloud key)
``megace-ctl-edge-<i>``         mutual TLS                          the edge agent's own connection (its
                                                                    receiver process logs in as the edge)
``megace-dev-e<i>-dev<j>``      mutual TLS                          verifies downlinks (its edge's key)
``megace-mon-loop``             TLS + password                      nothing: a read-only tap (the monitor)
``megace-dash-loop``            ``wss://`` + password (the page)    nothing: reads status/metrics/events
==============================  ==================================  ======================================

The broker (:class:`broker.runners.secure.SecureMosquitto`, static password + ACL files) has no
anonymous access and no plain listener; every identity gets exactly its ACL. With a ``ws_port`` it also
opens a ``wss://`` listener (TLS + password, same ACL) for the browser dashboard, which logs in as the
read-only ``dashboard`` identity: it can read ``megace/v1/{status,metrics,events}/#`` and publish nothing.
Signatures are *required* everywhere a key is configured, so an unsigned or foreign payload is refused and counted
(``rejected.<Error>`` on edges and devices, ``rejected_reasons`` on the cloud);
:func:`signature_rejections` adds them up for the report.

The broker is fresh and non-persistent, so nothing is retained from earlier runs: the loop's
clearing of stale retained topics (which needs write access to every site's topics, an access no
identity here has) is needed only on an external broker, where ``--secure`` is not offered.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from broker.address import BrokerAddress
from broker.runners.secure import SecureMosquitto
from megace.datasets import EdgeData
from megace.loop import configs
from megace.provision.identity import Identity, Role
from megace.provision.store import Store

#: The monitor's identity: read everything under ``megace/v1/``, publish nothing.
MONITOR = Identity(Role.MONITOR, "loop")
#: The web page's identity: read status, metrics and events, publish nothing (a password: browsers have no
#: client certificate to present over WebSockets).
DASHBOARD = Identity(Role.DASHBOARD, "loop")
HOST = "127.0.0.1"

#: What counts as a signature rejection: the error classes edges and devices count under
#: ``rejected.<Class>``, and the cloud's reasons for the same errors (``cloud_aggregator.intake``).
SIGNATURE_ERRORS = ("UnsignedError", "UnknownKeyError", "BadSignatureError", "SignatureError",
                    "ImpersonationError")
CLOUD_SIGNATURE_REASONS = ("unsigned", "unknown_key", "bad_signature", "impersonation")


def cloud_identity() -> Identity:
    return Identity(Role.CLOUD, configs.CLOUD_ID)


def edge_identity(edge: int) -> Identity:
    return Identity(Role.EDGE, configs.edge_id(edge), configs.site_id(edge))


def control_identity(edge: int) -> Identity:
    """The edge agent's own connection beside its receiver process (which logs in as the edge)."""
    return Identity(Role.CONTROL, configs.edge_id(edge), configs.site_id(edge))


def device_identity(site: str, device: str) -> Identity:
    return Identity(Role.DEVICE, device, site)


def loop_identities(parts: Iterable[EdgeData], *, dashboard: bool) -> list[Identity]:
    """Every identity a secured closed loop uses: the cloud and the monitor, each edge with its devices and its
    evaluator, and (``dashboard``) the read-only identity the browser page logs in with over ``wss://``."""
    idents = [cloud_identity(), MONITOR]
    for e in parts:
        site = configs.site_id(e.edge_id)
        idents += [edge_identity(e.edge_id), control_identity(e.edge_id)]
        idents += [device_identity(site, configs.device_id(e.edge_id, d.device_id)) for d in e.devices]
        idents.append(device_identity(site, f"e{e.edge_id}-eval"))
    return [*idents, DASHBOARD] if dashboard else idents


def _mtls(ident: Identity) -> bool:
    return ident.role not in (Role.MONITOR, Role.DASHBOARD)


class SecureBus:
    """The provisioning folder and the secure broker of one run; :meth:`close` stops the broker and removes a
    temporary folder (keys included). A ``state_dir`` is kept, and identities already issued there are reused."""

    def __init__(self, state_dir: Path | None = None, *, mode: Literal["static", "dynsec"] = "static") -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="megace-pki-") if state_dir is None else None
        self.root = Path(self._tmp.name) / "pki" if self._tmp else Path(state_dir)  # type: ignore[arg-type]
        self.mode = mode
        if (self.root / "registry.json").exists():
            self.store = Store.open(self.root)
        else:
            self.store = Store.init(self.root, [HOST])
        self.broker: SecureMosquitto | None = None
        self.issued: list[Identity] = []
        self.reused: list[Identity] = []

    # ---------------------------------------------------------------- identities
    def _usable(self, ident: Identity) -> bool:
        entry = self.store.entries.get(ident.username)
        if entry is None or entry.revoked or entry.identity != ident:
            return False
        folder = self.store.identity_dir(ident.username)
        need = ["ca.crt", "client.crt", "client.key"] if _mtls(ident) else ["ca.crt", "password"]
        if ident.role in (Role.EDGE, Role.CLOUD):
            need += ["signing.ed25519", "signing.ed25519.pub"]
        return all((folder / n).exists() for n in need)

    def provision(self, identities: Iterable[Identity]) -> None:
        """Issue every identity not yet usable in the folder: a certificate (mutual TLS) for services and
        devices, a password for the monitor and the dashboard, an Ed25519 signing key for the edges and the cloud."""
        for ident in identities:
            if self._usable(ident):
                self.reused.append(ident)
                continue
            self.store.add(ident, cert=_mtls(ident), password=not _mtls(ident),
                           signing_key=ident.role in (Role.EDGE, Role.CLOUD))
            self.issued.append(ident)

    # ---------------------------------------------------------------- broker
    def start(self, *, ws_port: int | None = None) -> SecureBus:
        """Start the broker; ``ws_port`` (0: a free one) also opens the dashboard's ``wss://`` listener."""
        if self.broker is None:
            self.broker = SecureMosquitto(self.store, mode=self.mode, host=HOST, ws_port=ws_port).start()
        return self

    def dashboard_login(self) -> dict[str, str] | None:
        """Where the page logs in: ``ws`` URL, ``user``, and the ``password_file`` and ``ca_file`` paths (never
        the password itself); None without a ``wss://`` listener or a provisioned dashboard identity."""
        if self.broker is None or self.broker.ws_url is None or DASHBOARD.username not in self.store.entries:
            return None
        folder = self.store.identity_dir(DASHBOARD.username)
        return {"ws": self.broker.ws_url, "user": DASHBOARD.username,
                "password_file": str((folder / "password").resolve()), "ca_file": str((folder / "ca.crt").resolve())}

    def address(self, ident: Identity) -> BrokerAddress:
        """How ``ident`` reaches the running broker (its certificate, or for the monitor its password)."""
        if self.broker is None:
            raise RuntimeError("secure broker not started")
        return self.broker.address(ident.username, mtls=_mtls(ident))

    def close(self) -> None:
        if self.broker is not None:
            self.broker.close()
            self.broker = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # ---------------------------------------------------------------- signing
    def private_key(self, ident: Identity) -> Path:
        return (self.store.identity_dir(ident.username) / "signing.ed25519").resolve()

    def public_key(self, ident: Identity) -> Path:
        return (self.store.identity_dir(ident.username) / "signing.ed25519.pub").resolve()

    def edge_signing(self, edge: int) -> dict[str, Any]:
        """The edge's ``[signing]``: its own key, the cloud's public key pinned, signatures required."""
        return {"key_file": str(self.private_key(edge_identity(edge))),
                "trusted_keys": [str(self.public_key(cloud_identity()))], "require": True}

    def cloud_signing(self, edges: Iterable[int]) -> dict[str, Any]:
        """The cloud's ``[signing]``: its own key and each edge's public key bound to its id and site."""
        bindings = {}
        for e in edges:
            ident = edge_identity(e)
            bindings[ident.name] = {"site": ident.site or "", "key": str(self.public_key(ident))}
        return {"key_file": str(self.private_key(cloud_identity())), "edges": bindings, "require": True}

    def control_folder(self, edge: int) -> str:
        """The edge's ``control_identity``: the folder its agent's own connection logs in from."""
        return str(self.store.identity_dir(control_identity(edge).username).resolve())

    def device_edge_key(self, edge: int) -> Path:
        """What a device of ``edge``'s site pins: the edge's public key."""
        return self.public_key(edge_identity(edge))

    # ---------------------------------------------------------------- report
    def describe(self) -> dict[str, Any]:
        b = self.broker
        roles: dict[str, int] = {}
        for ident in [*self.issued, *self.reused]:
            roles[ident.role.value] = roles.get(ident.role.value, 0) + 1
        return {
            "secure": True,
            "broker": f"private Mosquitto, {self.mode} password + ACL files" if self.mode == "static"
                      else "private Mosquitto, dynamic-security plugin",
            "listeners": ({"mutual_tls": f"mqtts://{b.host}:{b.mtls_port}",
                           "tls_password": f"mqtts://{b.host}:{b.password_port}",
                           **({"dashboard_wss": b.ws_url} if b.ws_url else {})} if b else {}),
            "anonymous": False,
            "tls": "TLS 1.2 (client certificates) for cloud, edges and devices; TLS + password for the monitor",
            "identities": roles,
            "issued": len(self.issued),
            "reused": len(self.reused),
            "acl": "per identity (docs/SECURITY.md); monitor: read-only megace/v1/#; dashboard: read-only "
                   "megace/v1/{status,metrics,events}/#",
            "signatures": "Ed25519, required: uploads (cloud checks each edge's key and site), globals and "
                          "feedback (edges pin the cloud's key), downlinks (devices pin their edge's key)",
            "state_dir": None if self._tmp else str(self.root),
        }


def signature_rejections(edge_metrics: Mapping[str, Mapping[str, Any]], cloud_metrics: Mapping[str, Mapping[str, Any]],
                         device_counters: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Signature rejections per service (``{"by": {name: n}, "total": n}``) from their metrics and counters.

    Edges report ``rejected_by_class`` (also flat ``rejected.<Class>``), the cloud ``rejected_reasons``, a
    device's SDK counts ``rejected.<Class>``; only the signature errors are counted here.
    """
    by: dict[str, int] = {}
    for edge, m in edge_metrics.items():
        classes = dict(m.get("rejected_by_class") or {})
        if not classes:
            classes = {k.split(".", 1)[1]: v for k, v in m.items() if k.startswith("rejected.")}
        by[edge] = sum(int(classes.get(c, 0) or 0) for c in SIGNATURE_ERRORS)
    for cloud, m in cloud_metrics.items():
        reasons = dict(m.get("rejected_reasons") or {})
        by[cloud] = sum(int(reasons.get(r, 0) or 0) for r in CLOUD_SIGNATURE_REASONS)
    for device, snap in device_counters.items():
        by[device] = sum(int(snap.get(f"rejected.{c}", 0) or 0) for c in SIGNATURE_ERRORS)
    return {"by": by, "total": sum(by.values())}


__all__ = ["DASHBOARD", "MONITOR", "SecureBus", "cloud_identity", "device_identity", "edge_identity",
           "signature_rejections"]
