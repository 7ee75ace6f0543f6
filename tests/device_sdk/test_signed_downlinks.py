"""A device given its edge's key takes only downlinks that edge signed; forged predictions never reach the app.

The attack from the trust issue: on an anonymous bus a forged prediction reached a device's callback.
Here an attacker publishes on the device's own downlink topic through a real broker.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from broker import topics
from broker.address import BrokerAddress
from broker.signing import Signer, generate_private_key, public_pem
from broker.wire import Kind, Prediction, encode_envelope
from device_sdk import DeviceClient


def prediction(edge: str, seq: int, label: int) -> bytes:
    body = Prediction("d1", 7, label, np.array([0.5, 0.5], np.float32), 3).to_body()
    return encode_envelope(Kind.PREDICTION, edge, seq, body)


def test_only_the_edges_signed_downlinks_reach_the_callback(mosquitto_addr: BrokerAddress, tmp_path: Path) -> None:
    edge, attacker = Signer(generate_private_key()), Signer(generate_private_key())
    (tmp_path / "edge.pub").write_bytes(public_pem(edge.public_key))
    site = f"s{uuid.uuid4().hex[:6]}"
    got: list[tuple[Kind, Any]] = []
    genuine = threading.Event()

    def on_downlink(kind: Kind, msg: Any) -> None:
        got.append((kind, msg))
        if msg.label == 1:
            genuine.set()

    dev = DeviceClient(site, "d1", mosquitto_addr, on_downlink=on_downlink, store_path=tmp_path / "q.sqlite",
                       edge_key=tmp_path / "edge.pub")
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"attacker-{uuid.uuid4().hex[:6]}",
                      protocol=mqtt.MQTTv311)
    try:
        assert dev.connect(10)
        time.sleep(0.3)  # the device's subscription is in place
        pub.connect(mosquitto_addr.host, mosquitto_addr.port)
        pub.loop_start()
        topic = topics.device_down(site, "d1", topics.Downlink.PREDICTION)
        for payload in (prediction("edge", 10, 9),  # unsigned
                        attacker.sign(prediction("edge", 11, 9)),  # signed by someone else
                        edge.sign(prediction("edge", 12, 9))[:-1] + b"\x01"):  # altered after signing
            pub.publish(topic, payload, qos=1).wait_for_publish(5)
        pub.publish(topic, edge.sign(prediction("edge", 13, 1)), qos=1).wait_for_publish(5)
        assert genuine.wait(10)
        assert [(k, m.label) for k, m in got] == [(Kind.PREDICTION, 1)]
        assert dev.counters["rejected.UnsignedError"] == 1
        assert dev.counters["rejected.UnknownKeyError"] == 1
        assert dev.counters["rejected.BadSignatureError"] == 1
    finally:
        pub.loop_stop()
        pub.disconnect()
        dev.close()


def test_a_downlink_delivered_twice_reaches_the_callback_once(mosquitto_addr: BrokerAddress, tmp_path: Path) -> None:
    """A publisher's resend after a lost PUBACK (a broker failing over) repeats an envelope exactly: the app sees
    it once. Another seq of the same sender, the same seq of another sender (an inference worker), and the same seq
    with other bytes (an edge re-installed with an empty state, its seqs started over) are new."""
    site = f"s{uuid.uuid4().hex[:6]}"
    labels: list[tuple[int, int]] = []
    done = threading.Event()

    def on_downlink(kind: Kind, msg: Any) -> None:
        labels.append((kind is Kind.PREDICTION, msg.label))
        if msg.label == 4:
            done.set()

    dev = DeviceClient(site, "d1", mosquitto_addr, on_downlink=on_downlink, store_path=tmp_path / "q.sqlite")
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edge-{uuid.uuid4().hex[:6]}",
                      protocol=mqtt.MQTTv311)
    try:
        assert dev.connect(10)
        time.sleep(0.3)
        pub.connect(mosquitto_addr.host, mosquitto_addr.port)
        pub.loop_start()
        topic = topics.device_down(site, "d1", topics.Downlink.PREDICTION)
        first = prediction("edge", 20, 1)  # a redelivery repeats the bytes (the envelope carries a timestamp)
        for payload in (first, first, prediction("edge", 21, 2), prediction("edge-w1", 20, 3), first,
                        prediction("edge", 20, 5), prediction("edge", 22, 4)):
            pub.publish(topic, payload, qos=1).wait_for_publish(5)
        assert done.wait(10)
        assert labels == [(True, 1), (True, 2), (True, 3), (True, 5), (True, 4)]
        assert dev.counters["downlink_duplicates"] == 2
        assert dev.counters["received.prediction"] == 5
    finally:
        pub.loop_stop()
        pub.disconnect()
        dev.close()
