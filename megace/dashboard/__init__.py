"""Dashboards over the broker: the JSON schemas of status, metrics and events, the web page and ``megace top``."""
