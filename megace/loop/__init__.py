"""The closed loop behind ``megace run``: broker, cloud and edge processes, simulated devices, reports.

Import-light: submodules pull in what they need (paho, rich, matplotlib, torch for parameter counts).
"""
