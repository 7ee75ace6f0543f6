"""Replay buffer, trainer and checkpoints of the edge model."""
