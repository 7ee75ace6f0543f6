"""The ``megace`` command line: the closed loop, the evaluation, and each service on its own.

Heavy modules (torch, the services, amqtt, matplotlib) are imported inside the commands, so
``megace --help`` is instant and ``megace edge`` does not pay for what only ``megace run`` needs.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from megace.dashboard.cli import register as register_dashboard  # typer only
from megace.experiment.cli import register as register_experiment  # typer only
from megace.provision.cli import app as provision_app  # typer only: cryptography loads inside its commands
from megace.signals import stop_on_signals

app = typer.Typer(
    name="megace",
    help="End-edge-cloud learning over MQTT: devices → edges (personalized LoRA) → cloud (heterogeneous "
    "adapter aggregation) → back down.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.add_typer(provision_app, name="provision")
register_dashboard(app)  # megace dashboard, megace top
register_experiment(app)  # megace experiment
extractors_app = typer.Typer(help="Feature extractors for devices (ONNX, run by device_sdk.extractors without torch).",
                             no_args_is_help=True)
app.add_typer(extractors_app, name="extractors")

#: the cloud's rule names (``cloud_aggregator.strategies.STRATEGIES``, which imports torch; a test keeps them equal)
STRATEGIES = ["fedavg", "hetlora", "flora", "flexlora", "fedsa", "modality-aware", "norm-clip", "trimmed-mean",
              "median"]


def _free_port() -> int:
    from broker.runners.ports import free_port

    return free_port("127.0.0.1")


def _with_dashboard(view: Callable[[str, Any], None], console: Any, page: Any) -> Callable[[str, Any], None]:
    """``--secure``: the run's progress callback, printing the page's ``wss://`` URL and login once the broker
    is up (the ``"dashboard"`` event; the password file's path, never the password)."""

    def progress(kind: str, payload: Any) -> None:
        if kind != "dashboard":
            view(kind, payload)
            return
        console.print(f"dashboard: [link]{page.url(payload['ws'], payload['user'])}[/link]", soft_wrap=True)
        console.print(f"  MQTT over wss:// as the read-only {payload['user']}; the page asks for the password, "
                      f"which is in {payload['password_file']}", soft_wrap=True)
        console.print(f"  the browser must trust {payload['ca_file']} (or accept the certificate once at "
                      f"{payload['ws'].replace('wss://', 'https://')}); Mosquitto 2.0.11 binds this listener on all "
                      "interfaces whatever its address: TLS, the password and the ACL protect it", soft_wrap=True)

    return progress


def _ranks(text: str) -> tuple[int, ...]:
    try:
        ranks = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"ranks must be comma-separated integers, got {text!r}") from None
    if not ranks or min(ranks) < 1:
        raise typer.BadParameter("ranks must be >= 1")
    return ranks


@app.command()
def run(
    dataset: Annotated[str, typer.Option(help="basicmotions (real accelerometer + gyroscope) or digits-av "
                                         "(real digit images + synthesized speech)")] = "basicmotions",
    edges: Annotated[int, typer.Option(min=1, help="edge agents (separate processes)")] = 3,
    devices_per_edge: Annotated[int, typer.Option(min=1, help="simulated devices per edge")] = 2,
    rounds: Annotated[int, typer.Option(min=1, help="stop after this many global versions")] = 5,
    strategy: Annotated[str | None, typer.Option(
        help=f"cloud aggregation rule: {', '.join(STRATEGIES)} (default: modality-aware; median with --secure, "
             "whose edges may be hostile: a weighted rule trusts the sample counts they claim)")] = None,
    alpha: Annotated[float, typer.Option(min=0.001, help="Dirichlet label skew across edges (small = non-IID)")] = 0.5,
    backbone: Annotated[str, typer.Option(help="tiny (fast, random frozen BERT) or minilm (bundled "
                                          "all-MiniLM-L6-v2, slower)")] = "tiny",
    ranks: Annotated[str, typer.Option(help="LoRA rank per edge, cycled")] = "8,4,2",
    steps: Annotated[int, typer.Option(min=1, help="optimizer steps per local round")] = 12,
    contrastive: Annotated[float, typer.Option(help="weight of the cross-modal contrastive loss (0 = off)")] = 0.1,
    seed: int = 0,
    time_limit: Annotated[float, typer.Option(help="stop after this many seconds")] = 600.0,
    broker: Annotated[str | None, typer.Option(help="use this broker (mqtt://user:pass@host:1883, mqtts://…) "
                                               "instead of starting the embedded one")] = None,
    ca_file: Annotated[Path | None, typer.Option(help="CA certificate for a TLS broker")] = None,
    username: Annotated[str | None, typer.Option(help="broker user name")] = None,
    password: Annotated[str | None, typer.Option(help="broker password", envvar="MEGACE_BROKER_PASSWORD")] = None,
    mosquitto: Annotated[bool, typer.Option(help="start a private Mosquitto instead of the embedded broker")] = False,
    secure: Annotated[bool, typer.Option(help="secure bus: a private Mosquitto with mutual TLS, one identity per "
                                         "service and device, per-identity ACLs and required Ed25519 signatures "
                                         "(default: the anonymous loopback demo)")] = False,
    state_dir: Annotated[Path | None, typer.Option(help="with --secure: the provisioning folder (CA, identities, "
                                                   "keys; kept and reused). Default: a temporary one, removed "
                                                   "after the run")] = None,
    out: Annotated[Path | None, typer.Option(help="report folder (default runs/<timestamp>)")] = None,
) -> None:
    """Run the closed loop on this machine and write a report (devices, edges, cloud, broker)."""
    from rich.console import Console

    from megace.loop.live import LiveView, summary_table
    from megace.loop.report import write_report
    from megace.loop.runner import ClosedLoop, LoopError
    from megace.loop.settings import LoopSettings

    strategy = strategy or ("median" if secure else "modality-aware")
    if strategy not in STRATEGIES:
        raise typer.BadParameter(f"strategy must be one of {STRATEGIES}", param_hint="--strategy")
    if backbone not in ("tiny", "minilm"):
        raise typer.BadParameter("backbone must be tiny or minilm", param_hint="--backbone")
    if secure and (broker or ca_file or username or password or mosquitto):
        raise typer.BadParameter("--secure starts its own Mosquitto and issues every credential: it takes no "
                                 "--broker, --ca-file, --username, --password or --mosquitto", param_hint="--secure")
    if state_dir and not secure:
        raise typer.BadParameter("--state-dir is the provisioning folder of --secure", param_hint="--state-dir")
    settings = LoopSettings(
        dataset=dataset, edges=edges, devices_per_edge=devices_per_edge, rounds=rounds, strategy=strategy,
        alpha=alpha, backbone=backbone, ranks=_ranks(ranks), steps_per_round=steps, contrastive_weight=contrastive,
        seed=seed, time_limit_s=time_limit, broker_url=broker, ca_file=str(ca_file) if ca_file else None,
        username=username, password=password, broker_kind="mosquitto" if mosquitto or secure else "embedded",
        out=out, secure=secure, state_dir=state_dir,
        ws_port=None if (broker or mosquitto) else _free_port(),  # the dashboard's (ws://, --secure: wss://)
    )
    console = Console()
    loop = ClosedLoop(settings)
    _log_to_file(loop.out / "megace.log")
    stop_on_signals()
    console.print(f"[bold]megace run[/]: {dataset}, {edges} edges x {devices_per_edge} devices, ranks {ranks}, "
                  f"strategy {strategy}, {rounds} rounds → {loop.out}")
    if secure:
        console.print("[bold green]secure bus[/]: private Mosquitto, no anonymous access; mutual TLS with one "
                      "certificate per service and device, per-identity ACLs, Ed25519 signatures required "
                      f"(provisioning folder: {state_dir or 'temporary'})")
    elif broker:
        console.print(f"bus: external broker {broker}")
    else:
        console.print("[yellow]anonymous loopback demo[/]: no TLS, identities, ACLs or signatures "
                      "(--secure for the secured set-up)")
    page = None
    if settings.ws_port:
        from megace.dashboard.server import DashboardServer

        page = DashboardServer().start()  # loopback, a daemon thread: it ends with the run
        if not secure:  # --secure: the wss:// URL and login once the broker is up (_with_dashboard)
            console.print(f"dashboard: [link]{page.url(f'ws://127.0.0.1:{settings.ws_port}/')}[/link] "
                          "(MQTT over WebSockets on the embedded broker, loopback only)")
    else:
        console.print("dashboard: `megace dashboard --ws URL` with the broker's WebSockets listener "
                      "(deploy/dashboard/README.md)")
    try:
        with LiveView(console, title="megace closed loop (secure)" if secure else "megace closed loop") as view:
            loop.progress = _with_dashboard(view, console, page) if secure and page else view
            result = loop.run()
    except LoopError as exc:
        console.print(f"[red]loop failed:[/] {exc}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; services stopped[/]")
        raise typer.Exit(130) from None
    report = write_report(result, loop.out)
    console.print(summary_table(result))
    if secure:
        rej = result.security.get("signature_rejections", {})
        signed = result.security.get("signed_on_bus", {})
        console.print(f"secure: TLS, {sum(result.security.get('identities', {}).values())} identities, ACLs, "
                      f"signatures; signature rejections: {rej.get('total', '?')}; signed on the bus: "
                      + ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in signed.items()))
    console.print(f"{result.stopped_because}; {result.wall_s:.0f} s. Report: [bold]{report}[/]")
    if not result.rounds:
        raise typer.Exit(1)


PROTOCOL_HELP = ("MQTT version: auto (5, falling back to 3.1.1), 5 or 3.1.1 (the default); sets MEGACE_BROKER_PROTOCOL "
                 "(a protocol= in the broker URL wins)")


def _protocol_env(protocol: str | None) -> None:
    """``--protocol``: the default every broker address of this process takes (``broker.protocol``)."""
    if protocol is not None:
        from broker.protocol import ProtocolSettingError, check_protocol

        try:
            os.environ["MEGACE_BROKER_PROTOCOL"] = check_protocol(protocol)
        except ProtocolSettingError as exc:
            raise typer.BadParameter(str(exc), param_hint="--protocol") from None


@app.command()
def edge(
    config: Annotated[Path, typer.Option("--config", "-c", help="edge agent TOML file")],
    protocol: Annotated[str | None, typer.Option(help=PROTOCOL_HELP)] = None,
    inference_workers: Annotated[int | None, typer.Option(
        min=0, help="extra inference processes sharing the site's requests (MQTT 5 shared subscription; "
        "none on a 3.1.1 broker); overrides the config's inference_workers")] = None,
) -> None:
    """Run an edge agent (the service a systemd unit starts)."""
    _protocol_env(protocol)  # a bad value is refused before the heavy import
    from edge_agent.cli import serve

    raise typer.Exit(serve(config, None if inference_workers is None else {"inference_workers": inference_workers}))


@app.command()
def infer(
    config: Annotated[Path, typer.Option("--config", "-c", help="the edge's TOML file (site, broker, state_dir)")],
    worker_id: Annotated[str, typer.Option(help="this worker's id, unique in the site ([A-Za-z0-9_-])")],
    protocol: Annotated[str | None, typer.Option(help=PROTOCOL_HELP)] = None,
) -> None:
    """Answer a site's prediction requests beside its edge (MQTT 5 shared subscription; exits 3 on 3.1.1)."""
    _protocol_env(protocol)  # a bad value is refused before the heavy import
    from edge_agent.infer_worker import serve

    raise typer.Exit(serve(str(config), worker_id))


@app.command()
def cloud(
    config: Annotated[Path, typer.Option("--config", "-c", help="cloud aggregator TOML file")],
    protocol: Annotated[str | None, typer.Option(help=PROTOCOL_HELP)] = None,
    ledger: Annotated[str | None, typer.Option(help="postgresql://… to run as one of several replicas sharing "
                                                    "that ledger (one leads); default: the config's [ledger] "
                                                    "url, else sqlite under state_dir")] = None,
) -> None:
    """Run the cloud aggregator."""
    _protocol_env(protocol)  # a bad value is refused before the heavy import
    from cloud_aggregator.cli import serve

    raise typer.Exit(serve(str(config), ledger))


@app.command("export-global")
def export_global_cmd(
    config: Annotated[Path, typer.Option("--config", "-c", help="cloud aggregator TOML file ([model], state_dir)")],
    out: Annotated[Path, typer.Option(help="artifact directory to write (replaced atomically)")],
    version: Annotated[int | None, typer.Option(help="global version (default: the latest)")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="override the config's state_dir")] = None,
) -> None:
    """Export a global from the cloud's ledger as a peft adapter (load it with megace_model.build_base)."""
    args = ["--config", str(config), "--out", str(out)]
    args += ["--version", str(version)] if version is not None else []
    args += ["--state-dir", str(state_dir)] if state_dir is not None else []
    from cloud_aggregator.export import main as export_main

    raise typer.Exit(export_main(args))


@extractors_app.command("build")
def extractors_build(
    out: Annotated[Path, typer.Option(help="bundle directory to write (replaced whole, never half-written)")],
    text: Annotated[bool, typer.Option(help="the MiniLM text encoder (ONNX + tokenizer.json, ~90 MB)")] = True,
    imu: Annotated[bool, typer.Option(help="the IMU front ends (basicmotions windows and statistics)")] = True,
    text_max_tokens: Annotated[int, typer.Option(min=1, help="text tokens per record")] = 16,
    text_pooling: Annotated[str, typer.Option(help="tokens, chunks or mean")] = "tokens",
) -> None:
    """Export the device feature extractors and a manifest (files, sha256, token_dim, max_tokens, source)."""
    import json

    from megace.extractors import MANIFEST, build_extractors

    if text_pooling not in ("tokens", "chunks", "mean"):
        raise typer.BadParameter("pooling must be tokens, chunks or mean", param_hint="--text-pooling")
    if not (text or imu):
        raise typer.BadParameter("nothing to build: --no-text and --no-imu together", param_hint="--no-imu")
    built = build_extractors(out, text=text, imu=imu, text_max_tokens=text_max_tokens, text_pooling=text_pooling)
    manifest = json.loads((built / MANIFEST).read_text())
    for name, entry in sorted(manifest["extractors"].items()):
        dims = {m: v["token_dim"] for m, v in entry["modalities"].items()} if "modalities" in entry else {
            entry["modality"]: entry["token_dim"]}
        tokens = 1 if entry.get("pooling") == "mean" else entry["max_tokens"]
        shapes = ", ".join(f"{m} [{tokens}, {d}]" for m, d in dims.items())
        typer.echo(f"{name}: {shapes}")
    typer.echo(f"bundle: {built} ({sum(f['bytes'] for f in manifest['files'].values()) / 1e6:.1f} MB)")


@app.command("broker")
def broker_cmd(
    port: Annotated[int, typer.Option(help="TCP port to listen on")] = 1883,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    ws_port: Annotated[int | None, typer.Option(help="also MQTT over WebSockets on this port (megace dashboard)")
                       ] = None,
) -> None:
    """Run the embedded MQTT broker (amqtt, MQTT 3.1.1) in the foreground until Ctrl-C."""
    import asyncio

    from broker.runners import EmbeddedBroker

    async def serve() -> None:
        async with EmbeddedBroker(host, port, ws_port=ws_port):
            typer.echo(f"embedded broker on mqtt://{host}:{port} (Ctrl-C to stop)")
            if ws_port:
                typer.echo(f"MQTT over WebSockets on ws://{host}:{ws_port}/ (megace dashboard --ws ws://{host}:{ws_port}/)")
            await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        typer.echo("broker stopped")


def _log_to_file(path: Path) -> None:
    """Library warnings go to the run folder, not through the live table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    for noisy in ("amqtt", "transitions", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app(prog_name="megace")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
