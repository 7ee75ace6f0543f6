"""Ways to get a broker: the embedded default (amqtt, in-process), Mosquitto, NATS (single node or cluster)
and RabbitMQ's MQTT plugin."""

from broker.runners.embedded import EmbeddedBroker
from broker.runners.mosquitto import MosquittoBroker
from broker.runners.nats import NatsBroker, NatsCluster
from broker.runners.ports import free_port
from broker.runners.process import find_mosquitto
from broker.runners.rabbitmq import RabbitMQBroker

__all__ = ["EmbeddedBroker", "MosquittoBroker", "NatsBroker", "NatsCluster", "RabbitMQBroker", "find_mosquitto",
           "free_port"]
