"""Cloud aggregator: aggregation strategies, staleness, validation and the durable ledger.

The service does its maths in numpy and never imports torch: only the one-off version-0 builder
(``bootstrap``, a child process) and the peft export (``export``) need it.  The package itself is
kept import-light, so a CLI can import submodules lazily.  Import what you need from submodules:

    from cloud_aggregator.contribution import Contribution, GlobalState
    from cloud_aggregator.strategies import get_strategy
    from cloud_aggregator.staleness import StalenessPolicy, BufferPolicy
    from cloud_aggregator.server_opt import get_server_optimizer
    from cloud_aggregator.validation import Validator
    from cloud_aggregator.ledger import Ledger
"""
