"""Edge multimodal model: config, classifier, LoRA adapters, contrastive loss, export."""
