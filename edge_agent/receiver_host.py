"""The agent's side of the ingest receiver process: start it, feed the log it writes to ingest, restart it.

:class:`ReceiverHost` is what the service talks to with ``ingest_receiver = "process"``: it starts
``python -m edge_agent.receiver`` (:mod:`edge_agent.receiver`), restarts it with backoff if it dies
(``receiver_restarts``), and on each ``c`` from it reads the new frames of the ingest log
(:class:`~edge_agent.logtail.LogTail`) and hands them to ``ingest`` on the agent's loop, a bounded
number at a time so inference requests and downlinks on the same loop are not held up behind a backlog.
After each batch it tells the receiver how far it got; that is the receiver's back-pressure signal.

A clean stop closes the receiver's stdin; the receiver logs and acknowledges what it holds and exits,
and the host reads the log to its end, so the agent's last checkpoint covers everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from broker.metrics import Counters
from edge_agent.config import EdgeConfig
from edge_agent.logtail import LogTail
from edge_agent.receiver import SHARED_COUNTERS, ReceiverSettings, infer_filters

log = logging.getLogger(__name__)

Ingest = Callable[[str, bytes, bool], None]

REGISTRATION_GRACE_S = 2.0
"""How long an inference request from a device not (yet) registered waits for the registration to come
through the log: the two travel on different connections, so the request can overtake it."""

BATCH = 256
"""Frames ingested per turn of the agent's loop."""

_ROOT = str(Path(__file__).resolve().parent.parent)


class ReceiverHost:
    """Supervises the receiver process and ingests what it logs; ``position`` is what a checkpoint records."""

    def __init__(self, settings: ReceiverSettings, counters: Counters, ingest: Ingest, *,
                 on_ready: Callable[[], None] | None = None, max_backoff_s: float = 5.0) -> None:
        self.settings = settings
        self.counters = counters
        self.ingest = ingest
        self.on_ready = on_ready
        self.max_backoff_s = max_backoff_s
        self.tail = LogTail(settings.directory, *settings.consumed)
        self.connected = asyncio.Event()
        """The receiver is connected to the broker (the moment a bare subscriber would start counting)."""
        self.ready = asyncio.Event()
        """The receiver has subscribed at least once."""
        self.process: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._reported = self.tail.position

    @classmethod
    def for_agent(cls, config: EdgeConfig, directory: Path, counters: Counters, ingest: Ingest,
                  on_ready: Callable[[], None] | None = None) -> ReceiverHost:
        """The host for an agent's ``config``; its log lives in ``directory`` (the agent's ``ingest/``)."""
        settings = ReceiverSettings(
            broker=config.broker, site=config.site, edge_id=config.edge_id, directory=str(directory),
            fsync=config.ingest_fsync, clean_session=not config.persistent_session,
            mqtt_queue=config.limits.mqtt_queue, max_lag_bytes=config.limits.ingest_max_lag_bytes,
            log_level=config.log_level)
        return cls(settings, counters, ingest, on_ready=on_ready)

    def seek(self, segment: int, offset: int) -> None:
        """Start reading at ``(segment, offset)`` (the restored checkpoint's); before :meth:`run`."""
        self.tail.close()
        self.tail = LogTail(self.settings.directory, segment, offset)
        self._reported = self.tail.position

    @property
    def position(self) -> tuple[int, int]:
        """``(segment, offset)`` after the last frame handed to ``ingest``."""
        return self.tail.position

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.returncode is None else None

    def checkpointed(self, position: tuple[int, int]) -> None:
        """A checkpoint holding everything before ``position`` committed: older segments can go."""
        self.tail.drop_before(position[0])

    # -- running -----------------------------------------------------------------------
    async def run(self) -> None:
        """Keep a receiver running and its log ingested until :meth:`stop`."""
        reader = asyncio.create_task(self._ingest_loop(), name="receiver-ingest")
        attempt = 0
        try:
            while not self._stopping:
                started = asyncio.get_running_loop().time()
                try:
                    code = await self._run_once()
                except OSError as exc:  # could not even start it (no memory, no such interpreter): retried
                    log.error("ingest receiver could not start: %s", exc)
                    code = None
                if self._stopping:
                    break
                self.counters.inc("receiver_restarts")
                log.warning("ingest receiver exited with %s; restarting", code)
                attempt = 0 if asyncio.get_running_loop().time() - started > 10 else attempt + 1
                await asyncio.sleep(min(self.max_backoff_s, 0.1 * 2 ** min(attempt, 10)))
        finally:
            self._wake.set()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self._drain(None)  # what the receiver logged before it stopped
            self.tail.close()

    async def _run_once(self) -> int | None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([_ROOT, os.environ.get("PYTHONPATH", "")])}
        self.settings.consumed = list(self.tail.position)
        proc = self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edge_agent.receiver", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=env)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(self.settings.to_json().encode() + b"\n")
        self._reported = self.tail.position
        try:
            await proc.stdin.drain()
            while line := await proc.stdout.readline():
                self._on_line(line)
        except (ConnectionError, OSError) as exc:
            log.warning("ingest receiver pipe: %s", exc)
        finally:
            self.connected.clear()
            with contextlib.suppress(ProcessLookupError):
                if proc.returncode is None and not self._stopping:
                    proc.kill()  # it closed its stdout: it must not go on acknowledging unseen
            code = await proc.wait()
            self._wake.set()  # the log's end may hold the last frames it wrote
        return code

    def _on_line(self, line: bytes) -> None:
        if line == b"c\n":
            self._wake.set()
        elif line.startswith(b"n "):
            for name, n in json.loads(line[2:]).items():
                self.counters.inc(name if name in SHARED_COUNTERS else f"receiver_{name}", int(n))
        elif line == b"connected\n":
            self.connected.set()
        elif line == b"ready\n":
            self.ready.set()
            if self.on_ready is not None:
                self.on_ready()

    async def _ingest_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._drain(BATCH):
                await asyncio.sleep(0)  # let inference and downlinks in between batches

    def _drain(self, limit: int | None) -> bool:
        """Ingest up to ``limit`` frames (None: all); True when there may be more."""
        frames = self.tail.read(limit if limit is not None else 1 << 62)
        ingest = self.ingest
        for topic, payload, retained in frames:
            ingest(topic, payload, retained)
        if frames:
            self._report()
            self._drained.set()
        return limit is not None and len(frames) >= limit

    async def caught_up(self, done: Callable[[], bool], timeout: float = REGISTRATION_GRACE_S) -> bool:
        """Wait until ``done()`` holds, re-checked after every batch read from the log, at most ``timeout`` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done():
            left = deadline - loop.time()
            if left <= 0:
                return False
            self._drained.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._drained.wait()
        return True

    def _report(self) -> None:
        position = self.tail.position
        proc = self.process
        if position == self._reported or proc is None or proc.stdin is None or proc.returncode is not None:
            return
        self._reported = position
        with contextlib.suppress(ConnectionError, RuntimeError):
            proc.stdin.write(b"p %d %d\n" % position)

    async def stop(self, timeout: float = 10.0) -> None:
        """Ask the receiver to finish (log and acknowledge what it holds) and wait for it."""
        self._stopping = True
        proc = self.process
        if proc is None or proc.returncode is not None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                proc.stdin.close()
        try:
            async with asyncio.timeout(timeout):
                await proc.wait()
        except TimeoutError:
            log.warning("ingest receiver did not stop in %.0f s; killed", timeout)
            self.kill()

    def kill(self) -> None:
        """Last resort (the agent is going away without a clean stop)."""
        proc = self.process
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()


__all__ = ["ReceiverHost", "infer_filters"]
