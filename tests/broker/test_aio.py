"""The asyncio helpers every service loop uses: waits that keep cancellations, publishes that re-raise them."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os

import aiomqtt
import pytest

from broker.aio import make_client, publish_one, wait_event


async def test_wait_event_says_whether_the_event_was_set() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    event.set()
    assert await wait_event(event, 0.01) is True
    assert await wait_event(event, None) is True


async def test_a_cancelled_wait_event_ends_its_task() -> None:
    event = asyncio.Event()
    task = asyncio.create_task(wait_event(event, None))
    await asyncio.sleep(0)
    task.cancel()
    event.set()  # the race that 3.11's wait_for loses
    with pytest.raises(asyncio.CancelledError):
        await task


class SwallowingClient:
    """Stands in for aiomqtt's publish when its PUBACK and a cancel() arrive together: 3.11's wait_for then
    returns normally and the CancelledError is gone. The race cannot be produced on demand with a real
    broker, so this one fault is staged."""

    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def publish(self, topic: str, payload: bytes, **_: object) -> None:
        self.started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return  # what asyncio.wait_for did in 3.11 when its future was already done


async def test_publish_one_re_raises_a_cancellation_the_client_swallowed() -> None:
    client = SwallowingClient()
    reached: list[str] = []

    async def loop() -> None:
        while True:
            await publish_one(client, "t", b"x")  # type: ignore[arg-type]
            reached.append("after publish")
            await asyncio.sleep(10)

    task = asyncio.create_task(loop())
    await client.started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)
    assert reached == []


@pytest.mark.parametrize("guarded", [False, True])
async def test_a_write_registered_as_the_connection_drops_logs_no_traceback(mosquitto_addr, guarded: bool) -> None:
    """paho asks for a write registration, then the connection drops before the loop runs it (a broker killed
    under load). Stock aiomqtt then hands asyncio an ``OSError: [Errno 9]`` (logged with a traceback by the
    services); the clients megace builds skip the registration. Real sockets on a real broker: only the order
    of the two events is arranged, within one turn of the loop."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    ident = f"race-{guarded}-{os.getpid()}"
    client = make_client(mosquitto_addr, identifier=ident) if guarded else \
        aiomqtt.Client(mosquitto_addr.host, mosquitto_addr.port, identifier=ident)
    try:
        with contextlib.suppress(aiomqtt.MqttError):
            async with client:
                paho = client._client
                sock = paho.socket()
                assert sock is not None
                client._on_socket_register_write(paho, None, sock)  # paho asks for a write ...
                paho._sock_close()  # ... and the connection is gone before the loop runs the registration
                await asyncio.sleep(0.1)
    finally:
        loop.set_exception_handler(previous)
    excs = [c.get("exception") for c in errors]
    if guarded:
        assert excs == []
    else:  # the control: the race is real with aiomqtt's own client
        assert any(isinstance(e, OSError) and e.errno == errno.EBADF for e in excs), errors
