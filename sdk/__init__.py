"""Packaging of the device SDK for gateways (``megace-device-sdk``): see ``pyproject.toml`` here."""
