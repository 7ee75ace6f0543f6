"""Ways to get a broker: the embedded default (amqtt, in-process) and Mosquitto."""

from broker.runners.embedded import EmbeddedBroker
from broker.runners.mosquitto import MosquittoBroker
from broker.runners.ports import free_port
from broker.runners.process import find_mosquitto

__all__ = ["EmbeddedBroker", "MosquittoBroker", "find_mosquitto", "free_port"]
