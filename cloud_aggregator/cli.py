"""``megace cloud --config FILE`` (and ``python -m cloud_aggregator``): run the service in the foreground.

SIGTERM/SIGINT set the stop event, so systemd's stop and Ctrl-C both finish the message in
hand, publish ``offline`` and close the ledger; exit status 0.  A bad config exits 2 before
anything touches the state directory.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from .config import CloudConfigError, load_cloud_config

log = logging.getLogger("cloud_aggregator")


def serve(config_path: str | None, ledger: str | None = None) -> int:
    """Load the config (file, env; ``ledger`` overrides ``[ledger] url``) and serve until SIGTERM/SIGINT;
    returns the exit status."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_cloud_config(config_path, None if ledger is None else {"ledger.url": ledger})
    except CloudConfigError as exc:
        print(f"megace cloud: {exc}", file=sys.stderr)
        return 2
    from .service import CloudAggregator  # the heavier imports only once the config is known good

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await CloudAggregator(config).run(stop)

    try:
        asyncio.run(main())
    except Exception as exc:  # e.g. a state dir of another base: say why, exit non-zero for Restart=on-failure
        log.critical("cloud aggregator failed: %s", exc, exc_info=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megace cloud", description="Run the megace cloud aggregator.")
    parser.add_argument("--config", "-c", help="TOML config (env MEGACE_CLOUD__<SECTION>__<KEY> overrides it)")
    parser.add_argument("--ledger", help="ledger URL: postgresql://... runs this process as one of several replicas "
                        "(one active, through a lease); default: sqlite in state_dir")
    args = parser.parse_args(argv)
    return serve(args.config, args.ledger)
