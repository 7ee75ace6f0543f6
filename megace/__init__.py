"""megace: end-edge-cloud learning platform (operator side).

Kept import-light on purpose: simulated devices import ``megace.datasets`` and must not pull in torch.
"""
