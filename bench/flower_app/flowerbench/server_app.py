"""ServerApp: FedAvg over exactly ``num-nodes`` SuperNodes per round, each round timed inside the ServerApp.

A round is timed from the moment FedAvg starts configuring it (sampling nodes, building the messages that
carry the current global) until the new global has been aggregated from every node's reply: the global
going down, the ClientApps running, their arrays coming up and the average. Before round 1 the app waits
until all nodes are connected, so that wait is not counted. Timings go to ``timings-file`` after each round.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


class TimedFedAvg(FedAvg):
    """FedAvg that records each round's start and end and checks every reply was averaged."""

    def __init__(self, nodes: int, floats: int, out: Path) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=nodes,
                         min_available_nodes=nodes)
        self.nodes, self.floats, self.out = nodes, floats, out
        self.started: dict[int, float] = {}
        self.rounds: list[dict[str, float | int]] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.started[server_round] = time.perf_counter()
        return list(super().configure_train(server_round, arrays, config, grid))

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        end = time.perf_counter()
        ok = sum(not m.has_error() for m in replies)
        size = 0 if arrays is None else sum(a.numpy().size for a in arrays.values())
        self.rounds.append({"round": server_round, "round_s": end - self.started[server_round],
                            "replies": ok, "aggregated_floats": int(size)})
        self.out.write_text(json.dumps({"nodes": self.nodes, "payload_floats": self.floats,
                                        "rounds": self.rounds}, indent=1))
        return arrays, metrics


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Wait for every node, then run the timed FedAvg rounds from a random initial global."""
    cfg = context.run_config
    nodes, rounds, floats = int(cfg["num-nodes"]), int(cfg["num-server-rounds"]), int(cfg["payload-floats"])
    out = Path(str(cfg["timings-file"]))
    deadline = time.monotonic() + 300
    while len(list(grid.get_node_ids())) < nodes:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {nodes} SuperNodes connected")
        time.sleep(0.2)
    initial = ArrayRecord([np.random.default_rng(0).standard_normal(floats).astype(np.float32)])
    TimedFedAvg(nodes, floats, out).start(grid=grid, initial_arrays=initial, num_rounds=rounds)
