"""ClientApp: answers each train message with a fresh random float32 array of the payload size, no training.

Random values, not constants: Flower's object store skips arrays it already holds, so a constant array
would understate the bytes it moves. Seeded by node and round so every reply is a distinct array.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Reply with an adapter-sized array, as an edge would after its (here skipped) local round."""
    floats = int(context.run_config["payload-floats"])
    server_round = int(msg.content["config"]["server-round"])
    rng = np.random.default_rng([int(context.node_id) % 2**32, server_round])
    arrays = ArrayRecord([rng.standard_normal(floats).astype(np.float32)])
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})})
    return Message(content=content, reply_to=msg)
