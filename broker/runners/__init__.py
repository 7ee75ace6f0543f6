"""Ways to get a broker: the embedded default (amqtt, in-process) and Mosquitto."""

from broker.runners.embedded import EmbeddedBroker
from broker.runners.mosquitto import MosquittoBroker, find_mosquitto
from broker.runners.ports import free_port

__all__ = ["EmbeddedBroker", "MosquittoBroker", "find_mosquitto", "free_port"]
