"""A real TCP relay between a client and a broker, for faults a test must produce on purpose.

The device connects to the relay, the relay to the broker. A test can *hold* one or both
directions of the live connections (bytes are read and kept, never forwarded: a broker whose
acknowledgements never arrive, or a network that swallows publishes) and *sever* them (both
sockets closed, as when a NAT or a link drops). Connections made after a sever are relayed
normally, so the client's own reconnect goes through.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field

from broker.address import BrokerAddress


@dataclass
class _Pair:
    client: socket.socket
    upstream: socket.socket
    hold_up: threading.Event = field(default_factory=threading.Event)  # client -> broker
    hold_down: threading.Event = field(default_factory=threading.Event)  # broker -> client
    held: list[bytes] = field(default_factory=list)  # what a hold swallowed (never forwarded)

    def close(self) -> None:
        for s in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


class TcpRelay:
    """Listens on a free loopback port and relays every connection to ``upstream``."""

    def __init__(self, upstream: BrokerAddress) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)  # close() must not wait on a blocking accept()
        self.address = BrokerAddress("127.0.0.1", self._listener.getsockname()[1])
        self._pairs: list[_Pair] = []
        self._lock = threading.Lock()
        self._closed = False
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept, name="relay-accept", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # listener closed
            client.settimeout(None)
            try:
                upstream = socket.create_connection((self.upstream.host, self.upstream.port), timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(client, upstream)
            with self._lock:
                if self._closed:
                    pair.close()
                    return
                self._pairs.append(pair)
                self.accepted += 1
            for src, dst, hold in ((client, upstream, pair.hold_up), (upstream, client, pair.hold_down)):
                threading.Thread(target=self._pump, args=(pair, src, dst, hold), daemon=True).start()

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket, hold: threading.Event) -> None:
        """Copy ``src`` to ``dst``; while ``hold`` is set, keep what arrives instead of forwarding it."""
        try:
            while data := src.recv(65536):
                if hold.is_set():
                    pair.held.append(data)
                else:
                    dst.sendall(data)
        except OSError:
            pass
        pair.close()  # one side gone: drop the other too, as a real broken link would
        with self._lock:  # no longer live: a finished connection (an MQTT 5 probe's) is not held or counted
            if pair in self._pairs:
                self._pairs.remove(pair)

    def hold(self, *, up: bool, down: bool) -> int:
        """Stop forwarding on the live connections (``up``: client to broker, ``down``: the way back); returns
        how many there are (connections that already ended, such as a protocol probe's, are not among them)."""
        with self._lock:
            live = list(self._pairs)
        for p in live:
            if up:
                p.hold_up.set()
            if down:
                p.hold_down.set()
        return len(live)

    def held_bytes(self) -> int:
        with self._lock:
            return sum(len(b) for p in self._pairs for b in p.held)

    def sever(self) -> None:
        """Close every live connection; later connections are relayed normally."""
        with self._lock:
            live, self._pairs = self._pairs, []
        for p in live:
            p.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._listener.close()
        self.sever()
        self._thread.join(5)

    def __enter__(self) -> TcpRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
