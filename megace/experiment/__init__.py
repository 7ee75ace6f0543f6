"""``megace experiment``: megace against local-only, FedIT, HetLoRA, FLoRA, FlexLoRA and ablations, over seeds."""
