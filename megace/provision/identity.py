"""Who may be on the bus and what each may touch: roles, the naming convention, per-identity ACL rules.

Convention (one string per identity, used three times so that nothing can be mixed up):
``username == MQTT client id == certificate CN``. The brokers we ship set
``use_username_as_clientid`` (and, on the certificate listener, ``use_identity_as_username``),
so whatever client id a client sends, its session is the one of the identity it proved; a
device's credentials cannot take over an edge's session. The prefixes are the client ids the
code already uses:

=========  ==========================  ====================================================
role       username / client id        may
=========  ==========================  ====================================================
device     ``megace-dev-<device>``     write its own uplinks, status, metrics; read its own downlinks
edge       ``megace-edge-<edge_id>``   read its site's uplinks, write its site's downlinks,
                                       its site's adapter upload, its own status/metrics;
                                       read the global adapter and its site's feedback
control    ``megace-ctl-<edge_id>``    the same edge's second connection when a receiver process holds
                                       the data session (``ingest_receiver``): the edge's grants, but of
                                       its site's uplinks only the inference requests
infer      ``megace-infer-<worker>``   an edge's inference worker (``<edge_id>-w<n>``): join its site's shared
                                       request group, read its site's registrations, write its site's
                                       predictions and errors; nothing else
cloud      ``megace-cloud-<cloud_id>`` read adapter uploads, write cloud downlinks, own status/metrics
dashboard  ``megace-dash-<name>``      read status, metrics and events
monitor    ``megace-mon-<name>``       read everything under ``megace/v1/``, write nothing (the
                                       operator's tap: ``megace run --secure`` times requests with it)
=========  ==========================  ====================================================

A device id is unique per broker (its client id carries no site). Rules are generated per
identity because Mosquitto patterns only substitute ``%u``/``%c`` as a whole topic level and
cannot tie a device to its site.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from broker import topics

R = topics.ROOT


class Role(StrEnum):
    """The roles that hold credentials (``admin`` only manages the dynamic-security plugin)."""

    DEVICE = "device"
    EDGE = "edge"
    CONTROL = "control"
    INFER = "infer"
    CLOUD = "cloud"
    DASHBOARD = "dashboard"
    MONITOR = "monitor"
    ADMIN = "admin"


PREFIX: dict[Role, str] = {
    Role.DEVICE: "megace-dev-",
    Role.EDGE: "megace-edge-",
    Role.CONTROL: "megace-ctl-",
    Role.INFER: "megace-infer-",
    Role.CLOUD: "megace-cloud-",
    Role.DASHBOARD: "megace-dash-",
    Role.MONITOR: "megace-mon-",
    Role.ADMIN: "megace-admin-",
}
SITED = (Role.DEVICE, Role.EDGE, Role.CONTROL, Role.INFER)


class Access(StrEnum):
    READ = "read"
    WRITE = "write"


@dataclass(frozen=True, slots=True)
class Rule:
    """One grant: ``access`` to topics matching the filter ``topic``.

    ``subscribe`` lists the literal filters the role's code subscribes with (the dynamic-security
    plugin checks a subscription filter against ``subscribePattern`` as a topic, so a ``+`` in a
    filter needs a literal grant too).
    """

    access: Access
    topic: str
    subscribe: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Identity:
    """One credential holder. ``site`` is required for devices and edges and forbidden otherwise."""

    role: Role
    name: str
    site: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", Role(self.role))
        topics.check_id(self.name, f"{self.role} name")
        if self.role in SITED:
            topics.check_id(self.site or "", "site")
        elif self.site is not None:
            raise ValueError(f"a {self.role} identity has no site")
        if len(self.username) > 64:
            raise ValueError(f"username {self.username!r} longer than 64 characters")

    @property
    def username(self) -> str:
        """Also the MQTT client id and the certificate's common name."""
        return PREFIX[self.role] + self.name

    @property
    def client_id(self) -> str:
        return self.username

    @classmethod
    def from_username(cls, username: str, site: str | None = None) -> Identity:
        """The identity a username names (``site`` for devices and edges comes from the registry)."""
        for role, prefix in PREFIX.items():
            if username.startswith(prefix):
                return cls(role, username[len(prefix):], site if role in SITED else None)
        raise ValueError(f"{username!r} follows no megace username convention ({', '.join(PREFIX.values())})")

    def rules(self) -> list[Rule]:
        """Everything this identity may do; anything else is refused by the broker."""
        return rules_for(self)

    def __str__(self) -> str:
        return f"{self.role} {self.name}" + (f" (site {self.site})" if self.site else "")


def _read(topic_filter: str, *subscribe: str) -> Rule:
    return Rule(Access.READ, topic_filter, subscribe or (topic_filter,))


def _write(topic_filter: str) -> Rule:
    return Rule(Access.WRITE, topic_filter)


def rules_for(ident: Identity) -> list[Rule]:
    """Per-identity grants; ``/#`` also covers a topic's chunk topics (``{topic}/chunk/{n}``)."""
    name, site = ident.name, ident.site or ""
    if ident.role is Role.DEVICE:
        down = topics.device_downlinks(site, name)
        return [
            _write(f"{R}/site/{site}/device/{name}/up/#"),
            _read(f"{R}/site/{site}/device/{name}/down/#", *topics.subscriptions(down)),
            _read(topics.register_request(site)),  # the edge's "register again" (site-wide, exact)
            _write(topics.status(topics.Role.DEVICE, name, site)),
            _write(topics.metrics(topics.Role.DEVICE, name, site)),
        ]
    if ident.role is Role.EDGE:
        return [_read(f"{R}/site/{site}/device/+/up/#", *topics.subscriptions(topics.site_device_uplinks(site)),
                      shared_request(site)), *_edge_rules(name, site)]
    if ident.role is Role.CONTROL:
        request = f"{R}/site/{site}/device/+/up/{topics.Uplink.INFER.value}"
        return [_read(f"{request}/#", *topics.subscriptions(request), shared_request(site)), *_edge_rules(name, site)]
    if ident.role is Role.INFER:
        return infer_rules(site)
    if ident.role is Role.CLOUD:
        return [
            _read(f"{R}/cloud/up/+/adapter/#", *topics.subscriptions(topics.all_adapter_uplinks())),
            _write(f"{R}/cloud/down/#"),
            _write(topics.status(topics.Role.CLOUD, name)),
            _write(topics.metrics(topics.Role.CLOUD, name)),
            _write(topics.events(topics.Role.CLOUD, name)),
        ]
    if ident.role is Role.DASHBOARD:
        return [_read(topics.all_status()), _read(topics.all_metrics()), _read(topics.all_events())]
    if ident.role is Role.MONITOR:
        # read-only tap on the whole tree (uplinks, downlinks, adapters, globals, status, metrics); it can
        # see every payload but change nothing: signatures, not secrecy, protect what it reads
        return [_read(f"{R}/#")]
    return []  # admin: only the plugin's $CONTROL topics, granted in the dynsec module


def _edge_rules(name: str, site: str) -> list[Rule]:
    """What an edge (and its control connection) may do besides reading device uplinks, as edge ``name``."""
    return [
        _write(f"{R}/site/{site}/device/+/down/#"),
        _write(topics.register_request(site)),
        _write(f"{topics.adapter_up(site)}/#"),
        _read(f"{topics.global_down()}/#", *topics.subscriptions(topics.global_down())),
        _read(f"{topics.site_feedback(site)}/#", *topics.subscriptions(topics.site_feedback(site))),
        _write(topics.status(topics.Role.EDGE, name, site)),
        _write(topics.metrics(topics.Role.EDGE, name, site)),
        _write(topics.events(topics.Role.EDGE, name, site)),
    ]


def shared_request(site: str) -> str:
    """The site's request filter in its default shared group (``edge_agent.infer_worker.group_name``).

    Mosquitto's ``acl_file`` checks a ``$share/<group>/<filter>`` subscription against ``<filter>``; the
    dynamic-security plugin checks the whole string, and only a literal grant matched it (2.0.11: a
    ``subscribePattern`` of ``$share/+/...`` did not). So dynsec grants this group only: a configured
    ``infer_group`` needs its own grant there."""
    return f"$share/megace-infer-{site}/{R}/site/{site}/device/+/up/{topics.Uplink.INFER.value}"


INFER_KINDS = (topics.Downlink.PREDICTION.value, topics.Downlink.ERROR.value)
"""What an inference worker answers with (a refused request gets its error); its grant names these kinds."""


def infer_rules(site: str) -> list[Rule]:
    """An inference worker's grants: whole requests through its site's shared group (any group name: the
    topic part pins the site), its site's registrations (to validate requests as the edge does, chunks
    included), its site's predictions and errors. Not features, uploads, globals, status or other sites."""
    base = f"{R}/site/{site}/device/+"
    request = f"{base}/up/{topics.Uplink.INFER.value}"
    register = f"{base}/up/{topics.Uplink.REGISTER.value}"
    return [
        _read(request, request, shared_request(site)),
        _read(f"{register}/#", *topics.subscriptions(register)),
        *(_write(f"{base}/down/{kind}") for kind in INFER_KINDS),
    ]
