"""Flower app for ``bench/bench_flower.py`` (runs inside Flower's own virtual environment, not megace's)."""
