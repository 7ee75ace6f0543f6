"""``python -m cloud_aggregator --config FILE``."""

from .cli import main

raise SystemExit(main())
