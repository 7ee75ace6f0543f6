"""``python -m megace``: the same CLI as the ``megace`` console script (the loop starts services this way)."""

from megace.cli import main

main()
