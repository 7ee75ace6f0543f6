"""Code the edge agent and the cloud aggregator share, below both services and above the bus contract.

Layers, lowest first; nothing imports from a layer above its own (``tests/test_layers.py`` checks):
``broker`` (the bus contract) <- ``device_sdk`` and ``megace_common`` <- ``megace_model`` (the
multimodal model and its adapters) <- ``edge_agent`` and ``cloud_aggregator`` <- ``megace`` (CLI,
closed loop, experiments).
"""
