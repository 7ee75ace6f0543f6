"""The megace bus contract: topic tree, wire codecs, chunking and broker runners.

Everything that crosses MQTT is defined here and only here, so devices, edges,
the cloud and dashboards cannot drift apart. This package never imports torch.
"""

WIRE_VERSION = 1
"""Schema version carried in every envelope; a receiver rejects any other."""
