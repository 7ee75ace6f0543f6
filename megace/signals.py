"""How the long-running commands (``megace run``, ``megace experiment``) stop: by unwinding, so clean-up runs."""

from __future__ import annotations


def stop_on_signals() -> None:
    """Ctrl-C and SIGTERM both unwind the loop (whose clean-up stops every child), even when the shell
    started us with SIGINT ignored (background jobs)."""
    import signal

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
