"""The multimodal model edge and cloud share: config, classifier, LoRA adapters, contrastive loss, export.

Below both services, so the cloud can describe and rebuild the base model without importing the
edge agent. Importing a submodule pulls torch; ``megace_model.config`` alone does not.
"""
