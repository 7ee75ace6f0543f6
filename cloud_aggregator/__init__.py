"""Cloud aggregator: aggregation strategies, staleness, validation and the durable ledger.

Kept import-light on purpose: importing the package must not pull torch, so that the
service (or a CLI) can import submodules lazily.  Import what you need from submodules:

    from cloud_aggregator.contribution import Contribution, GlobalState
    from cloud_aggregator.strategies import get_strategy
    from cloud_aggregator.staleness import StalenessPolicy, BufferPolicy
    from cloud_aggregator.server_opt import get_server_optimizer
    from cloud_aggregator.validation import Validator
    from cloud_aggregator.ledger import Ledger
"""
