"""Command-line entry of the edge agent: ``megace edge --config FILE`` and ``python -m edge_agent``.

SIGTERM / SIGINT set the stop event, so systemd's stop and Ctrl-C both get the clean
shutdown (round finished, checkpoint written, status offline). A crash exits non-zero,
so ``Restart=on-failure`` brings the agent back, and it resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from edge_agent.config import EdgeConfig, EdgeConfigError, load_edge_config

log = logging.getLogger("edge_agent")


async def _serve(config: EdgeConfig) -> None:
    from edge_agent.service import EdgeAgent  # torch import only once the config is known to be good

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await EdgeAgent(config).run(stop)


def serve(config_path: str | None, overrides: Mapping[str, Any] | None = None) -> int:
    """Run the agent until SIGTERM/SIGINT; 0 after a clean shutdown, 2 for a bad config, 1 on a crash."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        config = load_edge_config(config_path, overrides)
    except EdgeConfigError as exc:
        print(f"megace edge: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_serve(config))
    except Exception:
        log.exception("edge agent %s crashed", config.edge_id)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_agent", description="Run a megace edge agent.")
    parser.add_argument("--config", "-c", default=os.environ.get("MEGACE_EDGE_CONFIG"),
                        help="TOML config file (default: $MEGACE_EDGE_CONFIG; MEGACE_EDGE__* variables override)")
    args = parser.parse_args(argv)
    return serve(args.config)


__all__ = ["main", "serve"]
