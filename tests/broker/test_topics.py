from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import topics
from broker.errors import TopicError

ids = st.from_regex(r"\A[A-Za-z0-9_.\-]{1,64}\Z")


@given(site=ids, device=ids, what=st.sampled_from(list(topics.Uplink)))
def test_device_uplink_round_trips(site: str, device: str, what: topics.Uplink) -> None:
    t = topics.device_up(site, device, what)
    p = topics.parse(t)
    assert (p.channel, p.site, p.device, p.what) == (topics.Channel.DEVICE_UP, site, device, what.value)
    assert p.base == t


@given(site=ids, device=ids, what=st.sampled_from(list(topics.Downlink)), index=st.integers(0, 10_000))
def test_chunk_topics_parse_to_their_base(site: str, device: str, what: topics.Downlink, index: int) -> None:
    base = topics.device_down(site, device, what)
    p = topics.parse(topics.chunk(base, index))
    assert p.chunk_index == index
    assert p.base == base


def test_every_channel_parses_back() -> None:
    cases = {
        topics.adapter_up("s1"): topics.Channel.ADAPTER_UP,
        topics.global_down(): topics.Channel.GLOBAL_DOWN,
        topics.site_feedback("s1"): topics.Channel.SITE_FEEDBACK,
        topics.status(topics.Role.EDGE, "e1"): topics.Channel.STATUS,
        topics.metrics(topics.Role.CLOUD, "c"): topics.Channel.METRICS,
    }
    for t, channel in cases.items():
        p = topics.parse(t)
        assert p.channel is channel
        assert p.base == t


@pytest.mark.parametrize("bad", ["", "a/b", "x+y", "#", "a" * 65, "dev ice"])
def test_bad_ids_are_rejected(bad: str) -> None:
    with pytest.raises(TopicError):
        topics.device_up(bad, "d", topics.Uplink.FEATURES)


@pytest.mark.parametrize(
    "bad",
    ["megace/v2/cloud/down/global", "other/v1/x", "megace/v1/site/s/device/d/up/nope",
     "megace/v1/cloud/down/global/chunk/x", "megace/v1/status/alien/x", "megace/v1"],
)
def test_foreign_topics_are_rejected(bad: str) -> None:
    with pytest.raises(TopicError):
        topics.parse(bad)


def test_subscriptions_cover_chunks() -> None:
    assert topics.subscriptions(topics.global_down()) == [topics.global_down(), topics.global_down() + "/chunk/+"]
    assert topics.subscriptions(topics.all_status()) == [topics.all_status()]
