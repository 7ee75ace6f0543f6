"""The asyncio helpers every service loop uses: waits that keep cancellations, publishes that re-raise them."""

from __future__ import annotations

import asyncio

import pytest

from broker.aio import publish_one, wait_event


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
