from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import topics
from broker.errors import TopicError
from tests.support.wire import raises_exactly

ids = st.from_regex(r"\A[A-Za-z0-9_\-]{1,64}\Z")


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


ID_RULE = ("[A-Za-z0-9_-]{1,64} (letters, digits, '_' and '-'; a '.' becomes a topic level on RabbitMQ and is "
           "refused by NATS)")


def test_topic_strings() -> None:
    assert topics.device_up("s1", "d1", topics.Uplink.REGISTER) == "megace/v1/site/s1/device/d1/up/register"
    assert topics.device_up("s1", "d1", "infer") == "megace/v1/site/s1/device/d1/up/infer"  # type: ignore[arg-type]
    assert topics.device_down("s1", "d1", topics.Downlink.MODEL) == "megace/v1/site/s1/device/d1/down/model"
    assert topics.site_device_uplinks("s1") == "megace/v1/site/s1/device/+/up/+"
    assert topics.device_downlinks("s1", "d1") == "megace/v1/site/s1/device/d1/down/+"
    assert topics.adapter_up("s1") == "megace/v1/cloud/up/s1/adapter"
    assert topics.all_adapter_uplinks() == "megace/v1/cloud/up/+/adapter"
    assert topics.global_down() == "megace/v1/cloud/down/global"
    assert topics.site_feedback("s1") == "megace/v1/cloud/down/site/s1/feedback"
    assert topics.status(topics.Role.BROKER, "b") == "megace/v1/status/broker/b"
    assert topics.metrics(topics.Role.DEVICE, "gw-7") == "megace/v1/metrics/device/gw-7"
    assert topics.all_status() == "megace/v1/status/#"
    assert topics.all_metrics() == "megace/v1/metrics/#"
    assert topics.chunk(topics.global_down(), 0) == "megace/v1/cloud/down/global/chunk/0"
    assert topics.ROOT == "megace/v1"


@pytest.mark.parametrize(
    ("build", "what"),
    [
        (lambda bad: topics.device_up(bad, "d", topics.Uplink.FEATURES), "site"),
        (lambda bad: topics.device_up("s", bad, topics.Uplink.FEATURES), "device"),
        (lambda bad: topics.device_down(bad, "d", topics.Downlink.CONFIG), "site"),
        (lambda bad: topics.device_down("s", bad, topics.Downlink.CONFIG), "device"),
        (lambda bad: topics.site_device_uplinks(bad), "site"),
        (lambda bad: topics.device_downlinks(bad, "d"), "site"),
        (lambda bad: topics.device_downlinks("s", bad), "device"),
        (lambda bad: topics.adapter_up(bad), "site"),
        (lambda bad: topics.site_feedback(bad), "site"),
        (lambda bad: topics.status(topics.Role.EDGE, bad), "id"),
        (lambda bad: topics.metrics(topics.Role.EDGE, bad), "id"),
        (lambda bad: topics.check_id(bad), "id"),
    ],
)
@pytest.mark.parametrize("bad", ["", "a/b", "+", "x#", "a" * 65, "dev ice", "dev\n", "é", "gw.7", "."])
def test_every_builder_checks_its_ids(build, what: str, bad: str) -> None:  # type: ignore[no-untyped-def]
    with raises_exactly(TopicError, f"invalid {what} {bad!r}: must match {ID_RULE}"):
        build(bad)


def test_id_rule_edges() -> None:
    assert topics.check_id("a" * 64) == "a" * 64
    assert topics.check_id("A-z_09") == "A-z_09"
    assert topics.check_id("x", "site") == "x"
    with raises_exactly(TopicError, f"invalid site None: must match {ID_RULE}"):
        topics.check_id(None, "site")  # type: ignore[arg-type]
    with raises_exactly(TopicError, f"invalid id 5: must match {ID_RULE}"):
        topics.check_id(5)  # type: ignore[arg-type]


def test_unknown_enum_members_are_rejected_when_building() -> None:
    with pytest.raises(ValueError):
        topics.device_up("s", "d", "config")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        topics.status("alien", "x")  # type: ignore[arg-type]


def test_chunk_index_must_not_be_negative() -> None:
    with raises_exactly(TopicError, "negative chunk index -1"):
        topics.chunk(topics.global_down(), -1)


@pytest.mark.parametrize(
    ("topic", "fields"),
    [
        ("megace/v1/site/s1/device/d1/up/features",
         dict(channel=topics.Channel.DEVICE_UP, site="s1", device="d1", what="features")),
        ("megace/v1/site/s1/device/d1/down/error",
         dict(channel=topics.Channel.DEVICE_DOWN, site="s1", device="d1", what="error")),
        ("megace/v1/cloud/up/s1/adapter", dict(channel=topics.Channel.ADAPTER_UP, site="s1", what="adapter")),
        ("megace/v1/cloud/down/global", dict(channel=topics.Channel.GLOBAL_DOWN, what="global")),
        ("megace/v1/cloud/down/site/s1/feedback",
         dict(channel=topics.Channel.SITE_FEEDBACK, site="s1", what="feedback")),
        ("megace/v1/status/cloud/c1", dict(channel=topics.Channel.STATUS, role=topics.Role.CLOUD, ident="c1")),
        ("megace/v1/metrics/device/gw-7", dict(channel=topics.Channel.METRICS, role=topics.Role.DEVICE, ident="gw-7")),
    ],
)
def test_parse_takes_every_layout_apart(topic: str, fields: dict) -> None:
    topics._PARSED.clear()  # parse the string, not a cached result of an earlier test
    assert topics.parse(topic) == topics.Parsed(**fields)
    assert topics.parse(topic).base == topic
    chunked = topics.parse(topic + "/chunk/12")
    assert chunked == topics.Parsed(**fields, chunk_index=12)
    assert chunked.base == topic


@pytest.mark.parametrize(
    ("topic", "why"),
    [
        ("megace/v1/site/s/device/d/up/nope", "'nope' is not a valid Uplink"),
        ("megace/v1/site/s/device/d/down/features", "'features' is not a valid Downlink"),
        ("megace/v1/status/alien/x", "'alien' is not a valid Role"),
        ("megace/v1/site/s/device/d/up", "unknown layout"),
        ("megace/v1/cloud/down/global/extra", "unknown layout"),
        ("megace/v1/cloud/down/global/chunk/x", "unknown layout"),
        ("megace/v1/cloud/down/global/chunk/-1", "unknown layout"),
        ("megace/v1/chunk/3", "unknown layout"),
        ("megace/v1/cloud/up/a+b/adapter", f"invalid id 'a+b': must match {ID_RULE}"),
        ("megace/v1/site/s/device//up/features", f"invalid id '': must match {ID_RULE}"),
        ("megace/v1/status/edge/" + "e" * 65, f"invalid id '{'e' * 65}': must match {ID_RULE}"),
        ("megace/v1/", "unknown layout"),
    ],
)
def test_parse_errors_say_why(topic: str, why: str) -> None:
    with raises_exactly(TopicError, f"not a megace/v1 topic: {topic!r} ({why})"):
        topics.parse(topic)


@pytest.mark.parametrize("topic", ["megace/v2/cloud/down/global", "megace/v1", "megace/v1cloud/down/global", "",
                                   "/megace/v1/cloud/down/global", None, b"megace/v1/cloud/down/global"])
def test_foreign_roots_are_rejected(topic: object) -> None:
    with raises_exactly(TopicError, f"not a megace/v1 topic: {topic!r}"):
        topics.parse(topic)  # type: ignore[arg-type]


def test_parse_cache_is_shared_and_bounded() -> None:
    t = topics.adapter_up("cached")
    assert topics.parse(t) is topics.parse(t)
    topics._PARSED.clear()
    for i in range(topics._PARSED_MAX):
        topics.parse(topics.adapter_up(f"s{i}"))
    assert len(topics._PARSED) == topics._PARSED_MAX
    topics.parse(topics.adapter_up("one-more"))
    assert list(topics._PARSED) == [topics.adapter_up("one-more")]
    # failures are not cached
    with raises_exactly(TopicError):
        topics.parse("megace/v1/nope")
    assert "megace/v1/nope" not in topics._PARSED


def test_parsed_base_of_hand_made_values() -> None:
    assert topics.Parsed(topics.Channel.STATUS, ident="x").base == "megace/v1/status/edge/x"
    assert topics.Parsed(topics.Channel.METRICS, ident="x").base == "megace/v1/metrics/edge/x"
    assert topics.Parsed(topics.Channel.GLOBAL_DOWN, chunk_index=3).base == "megace/v1/cloud/down/global"
    # a missing id never turns into a topic
    incomplete = [
        topics.Parsed(topics.Channel.ADAPTER_UP),
        topics.Parsed(topics.Channel.SITE_FEEDBACK),
        topics.Parsed(topics.Channel.DEVICE_UP, device="d", what="features"),
        topics.Parsed(topics.Channel.DEVICE_UP, site="s", what="features"),
        topics.Parsed(topics.Channel.DEVICE_DOWN, device="d", what="config"),
        topics.Parsed(topics.Channel.DEVICE_DOWN, site="s", what="config"),
        topics.Parsed(topics.Channel.STATUS, role=topics.Role.CLOUD),
        topics.Parsed(topics.Channel.METRICS, role=topics.Role.CLOUD),
    ]
    for p in incomplete:
        with raises_exactly(TopicError):
            _ = p.base


def test_subscription_filters() -> None:
    assert topics.subscriptions(topics.site_device_uplinks("s")) == [
        "megace/v1/site/s/device/+/up/+", "megace/v1/site/s/device/+/up/+/chunk/+"]
    assert topics.subscriptions(topics.all_metrics()) == ["megace/v1/metrics/#"]
    assert topics.subscriptions("megace/v1/#") == ["megace/v1/#"]


def test_dashboard_topics_carry_the_site_of_devices_and_edges() -> None:
    """Status, metrics and events: ``{kind}/{role}/{site}/{id}`` with a site, ``{kind}/{role}/{id}`` without
    (the cloud, and publishers from before the site level), and both parse back to the same fields."""
    built = {
        topics.status(topics.Role.DEVICE, "gw-7", "site-a"): ("megace/v1/status/device/site-a/gw-7",
                                                             topics.Channel.STATUS),
        topics.metrics(topics.Role.EDGE, "e1", "s1"): ("megace/v1/metrics/edge/s1/e1", topics.Channel.METRICS),
        topics.events(topics.Role.EDGE, "e1", "s1"): ("megace/v1/events/edge/s1/e1", topics.Channel.EVENTS),
        topics.events(topics.Role.CLOUD, "c"): ("megace/v1/events/cloud/c", topics.Channel.EVENTS),
    }
    for topic, (expected, channel) in built.items():
        assert topic == expected
        p = topics.parse(topic)
        assert p.channel is channel and p.base == topic
        assert p.site == (expected.split("/")[4] if expected.count("/") == 5 else None)
        assert p.ident == expected.rsplit("/", 1)[1] and p.role is topics.Role(expected.split("/")[3])
    assert topics.all_events() == "megace/v1/events/#"
    assert topics.parse("megace/v1/events/edge/s1/e1/chunk/2").chunk_index == 2
    for bad in ("megace/v1/events/edge/s1/e1/x", "megace/v1/events/alien/e1", "megace/v1/status/edge/s!/e1",
                "megace/v1/events", "megace/v1/metrics/edge/s1/" + "e" * 65):
        with raises_exactly(TopicError):
            topics.parse(bad)
    with raises_exactly(TopicError):
        topics.metrics(topics.Role.DEVICE, "gw-7", "bad site")
