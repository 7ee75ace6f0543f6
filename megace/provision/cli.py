"""``megace provision``: create the CA, issue identities, revoke them, and keep the broker's files in step.

Imports ``cryptography`` only inside the commands, so ``megace --help`` stays instant.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from megace.provision.dynsec import DynsecAdmin
    from megace.provision.identity import Identity
    from megace.provision.store import Store

app = typer.Typer(help="Identities and credentials for the bus: a CA, certificates, passwords, per-identity ACLs "
                  "(static files or Mosquitto's dynamic-security plugin).", no_args_is_help=True)

Folder = Annotated[Path, typer.Argument(help="provisioning folder (keep it private; ca/ ideally offline)")]
NoCert = Annotated[bool, typer.Option("--no-cert", help="no client certificate (password only)")]
NoPassword = Annotated[bool, typer.Option("--no-password", help="no password (certificate only)")]
DynsecUrl = Annotated[str | None, typer.Option(
    help="also apply the change to a running broker's dynamic-security plugin at this mqtts:// URL "
         "(as the admin identity of the folder)")]
ReloadPid = Annotated[int | None, typer.Option(help="send SIGHUP to this Mosquitto process after the change "
                                               "(static set-up: re-reads password, ACL and CRL files)")]


def _open(folder: Path) -> Store:
    from megace.provision.store import Store

    try:
        return Store.open(folder)
    except FileNotFoundError as exc:
        raise typer.BadParameter(str(exc)) from None


def _admin(store: Store, url: str) -> DynsecAdmin:
    from broker.address import BrokerAddress, read_secret
    from megace.provision.dynsec import DynsecAdmin

    a = BrokerAddress.from_url(url, env={})
    folder = store.identity_dir(store.admin_username)
    password = read_secret(folder / "password")
    return DynsecAdmin(BrokerAddress(a.host, a.port, a.tls, a.ca_file or str(folder / "ca.crt"),
                                     store.admin_username, password))


def _issue(folder: Path, ident: Identity, *, cert: bool, password: bool, signing_key: bool,
           dynsec_url: str | None, reload_pid: int | None) -> None:
    from broker.address import read_secret
    from megace.provision.dynsec import DynsecError
    from megace.provision.static import new_password, reload_broker

    if not cert and not password:
        raise typer.BadParameter("an identity needs a certificate or a password")
    store = _open(folder)
    existed = ident.username in store.entries
    try:
        out = store.add(ident, cert=cert, password=password, signing_key=signing_key)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if dynsec_url:
        admin = _admin(store, dynsec_url)
        if existed:  # rotation: the old client goes (and is kicked), the new one comes
            with contextlib.suppress(DynsecError):  # it was not registered with this broker
                admin.revoke(ident.username)
        # a certificate-only identity gets a password nobody knows: the plugin needs one
        admin.add(ident, read_secret(out / "password") if password else new_password())
    if reload_pid:
        reload_broker(reload_pid)
    typer.echo(f"{ident}: username / client id / certificate CN {ident.username}")
    typer.echo(f"  files in {out}  (broker.url: mutual TLS; broker-password.url: TLS + password)")


@app.command()
def init(
    folder: Folder,
    host: Annotated[list[str], typer.Option(help="broker host name or IP in its certificate (repeatable); "
                                            "the first is used in the URLs")],
    mtls_port: Annotated[int, typer.Option(help="port of the mutual TLS listener")] = 8883,
    password_port: Annotated[int, typer.Option(help="port of the TLS + password listener")] = 8884,
) -> None:
    """Create a CA, the broker's server certificate and the dynamic-security admin identity."""
    from megace.provision.store import Store

    try:
        store = Store.init(folder, host, mtls_port=mtls_port, password_port=password_port)
    except FileExistsError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(f"CA and broker certificate for {', '.join(store.hosts)} in {folder}; install {store.broker_dir} "
               "on the broker (see deploy/mosquitto/megace.conf)")


@app.command()
def device(folder: Folder, site: str, name: str, no_cert: NoCert = False, no_password: NoPassword = False,
           dynsec_url: DynsecUrl = None, reload_pid: ReloadPid = None) -> None:
    """Issue (or rotate) a device's credentials: it may only use its own topics in its own site."""
    from megace.provision.identity import Identity, Role

    _issue(folder, Identity(Role.DEVICE, name, site), cert=not no_cert, password=not no_password,
           signing_key=False, dynsec_url=dynsec_url, reload_pid=reload_pid)


@app.command()
def edge(folder: Folder, site: str, edge_id: str, no_cert: NoCert = False, no_password: NoPassword = False,
         signing_key: Annotated[bool, typer.Option(help="also an Ed25519 payload-signing key")] = True,
         control: Annotated[bool, typer.Option(help="also the control identity megace-ctl-<edge_id>: the agent's "
                                               "own connection beside its receiver process")] = True,
         dynsec_url: DynsecUrl = None, reload_pid: ReloadPid = None) -> None:
    """Issue (or rotate) an edge agent's credentials for one site (and those of its control connection)."""
    from megace.provision.identity import Identity, Role

    _issue(folder, Identity(Role.EDGE, edge_id, site), cert=not no_cert, password=not no_password,
           signing_key=signing_key, dynsec_url=dynsec_url, reload_pid=None)
    if control:
        _issue(folder, Identity(Role.CONTROL, edge_id, site), cert=not no_cert, password=not no_password,
               signing_key=False, dynsec_url=dynsec_url, reload_pid=None)
        typer.echo("  set the edge's control_identity to that folder (ingest_receiver auto or process)")
    if reload_pid:
        from megace.provision.static import reload_broker

        reload_broker(reload_pid)


@app.command()
def workers(folder: Folder, site: str, edge_id: str,
            count: Annotated[int, typer.Option(min=1, help="how many workers (<edge_id>-w1 .. -wN)")] = 1,
            grant_days: Annotated[int, typer.Option(min=1, help="how long devices accept the edge's grant of "
                                                    "each worker's signing key")] = 365,
            no_cert: NoCert = False, no_password: NoPassword = False, reload_pid: ReloadPid = None) -> None:
    """Issue (or rotate) an edge's inference workers: identities of role infer, own signing keys, the edge's grants."""
    from megace.provision.static import reload_broker
    from megace.provision.workers import issue_workers

    if no_cert and no_password:
        raise typer.BadParameter("an identity needs a certificate or a password")
    try:
        folders = issue_workers(_open(folder), site, edge_id, count, cert=not no_cert, password=not no_password,
                                days=grant_days)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if reload_pid:
        reload_broker(reload_pid)
    for out in folders:
        typer.echo(f"infer {out.name.removeprefix('megace-infer-')} (site {site}): files in {out}")
    typer.echo(f"  give the edge host {folders[0].parent} (or these folders) and set worker_identities to it")


@app.command()
def cloud(folder: Folder, cloud_id: Annotated[str, typer.Argument()] = "cloud", no_cert: NoCert = False,
          no_password: NoPassword = False,
          signing_key: Annotated[bool, typer.Option(help="also an Ed25519 payload-signing key")] = True,
          dynsec_url: DynsecUrl = None, reload_pid: ReloadPid = None) -> None:
    """Issue (or rotate) the cloud aggregator's credentials."""
    from megace.provision.identity import Identity, Role

    _issue(folder, Identity(Role.CLOUD, cloud_id), cert=not no_cert, password=not no_password,
           signing_key=signing_key, dynsec_url=dynsec_url, reload_pid=reload_pid)


@app.command()
def dashboard(folder: Folder, name: str, no_cert: NoCert = False, no_password: NoPassword = False,
              dynsec_url: DynsecUrl = None, reload_pid: ReloadPid = None) -> None:
    """Issue (or rotate) read-only dashboard credentials (status and metrics)."""
    from megace.provision.identity import Identity, Role

    _issue(folder, Identity(Role.DASHBOARD, name), cert=not no_cert, password=not no_password,
           signing_key=False, dynsec_url=dynsec_url, reload_pid=reload_pid)


@app.command()
def monitor(folder: Folder, name: str, no_cert: NoCert = False, no_password: NoPassword = False,
            dynsec_url: DynsecUrl = None, reload_pid: ReloadPid = None) -> None:
    """Issue (or rotate) a read-only monitor: may read everything under megace/v1/ (a tap), publish nothing."""
    from megace.provision.identity import Identity, Role

    _issue(folder, Identity(Role.MONITOR, name), cert=not no_cert, password=not no_password,
           signing_key=False, dynsec_url=dynsec_url, reload_pid=reload_pid)


@app.command()
def site(folder: Folder, site: str, edge_id: Annotated[str, typer.Option(help="the site's edge agent")],
         devices: Annotated[str, typer.Option(help="comma-separated device ids")] = "",
         reload_pid: ReloadPid = None) -> None:
    """Issue an edge (with its control identity) and its devices for one site in one go."""
    from megace.provision.identity import Identity, Role

    for ident in (Identity(Role.EDGE, edge_id, site), Identity(Role.CONTROL, edge_id, site)):
        _issue(folder, ident, cert=True, password=True, signing_key=ident.role is Role.EDGE, dynsec_url=None,
               reload_pid=None)
    for name in (d for d in devices.split(",") if d):
        _issue(folder, Identity(Role.DEVICE, name, site), cert=True, password=True, signing_key=False,
               dynsec_url=None, reload_pid=None)
    if reload_pid:
        from megace.provision.static import reload_broker

        reload_broker(reload_pid)


@app.command()
def revoke(folder: Folder, username: str, dynsec_url: DynsecUrl = None, reload_pid: ReloadPid = None) -> None:
    """Revoke one identity: out of the password and ACL files, certificate on the CRL, deleted and kicked (dynsec)."""
    from megace.provision.static import reload_broker

    store = _open(folder)
    try:
        ident = store.revoke(username)
    except KeyError as exc:
        raise typer.BadParameter(str(exc)) from None
    if dynsec_url:
        _admin(store, dynsec_url).revoke(username)
    if reload_pid:
        reload_broker(reload_pid)
    typer.echo(f"revoked {ident} ({username}); install {store.broker_dir}/crl.pem, megace.passwd and megace.acl "
               "on the broker and reload it (SIGHUP) unless --reload-pid/--dynsec-url did it")


@app.command("list")
def list_cmd(folder: Folder) -> None:
    """Every identity of the folder, with its state."""
    store = _open(folder)
    for username, e in sorted(store.entries.items()):
        creds = "+".join(x for x, on in (("cert", e.serial is not None), ("password", e.password_hash)) if on)
        typer.echo(f"{username:40} {e.identity.role.value:9} {e.identity.site or '-':12} {creds:14} "
                   f"{'REVOKED' if e.revoked else 'active'}")


@app.command()
def crl(folder: Folder, reload_pid: ReloadPid = None) -> None:
    """Re-sign the CRL and rewrite the broker files (a CRL expires after 30 days: run this from cron)."""
    from megace.provision.static import reload_broker

    _open(folder).write_broker_files()
    if reload_pid:
        reload_broker(reload_pid)
