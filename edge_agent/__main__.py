"""``python -m edge_agent --config FILE``."""

from edge_agent.cli import main

raise SystemExit(main())
