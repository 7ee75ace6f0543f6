"""Edge agent: multimodal model, adapters, training and (later) the MQTT service.

Kept free of heavy imports so ``import edge_agent`` stays cheap; import
``megace_model`` / ``edge_agent.training`` explicitly.
"""
