"""Reliability under broker crashes: real Mosquitto processes, real clients, SIGTERM and SIGKILL."""
