"""The edge's request to its site's devices: "publish your registration again" (``register_request``).

Why: registrations are retained, and an edge that starts with an empty registry used to learn its devices
from the retained messages its ``device/+/up/+`` filter matched. RabbitMQ's MQTT plugin never delivers a
retained message through a wildcard filter, so that edge saw no device at all and refused every record as
``unregistered``. The edge now publishes this request (not retained) on the site's exact topic
:func:`broker.topics.register_request` each time it has subscribed; every device of the site answers by
publishing its registration again, live, which every broker delivers through wildcards.
"""

from __future__ import annotations

from typing import Any

from broker import topics
from broker.compat import slotted_dataclass
from broker.errors import DecodeError, TopicError
from broker.wire.fields import body_map, get_str


@slotted_dataclass(frozen=True)
class RegisterRequest:
    """``{"site": str, "edge": str}``: which site's devices should register again, and which edge asks."""

    site: str
    edge: str

    def to_body(self) -> dict[str, Any]:
        return {"site": topics.check_id(self.site, "site"), "edge": topics.check_id(self.edge, "edge")}

    @classmethod
    def from_body(cls, body: Any) -> RegisterRequest:
        b = body_map(body, "register_request")
        site, edge = get_str(b, "site"), get_str(b, "edge")
        try:
            return cls(topics.check_id(site or "", "site"), topics.check_id(edge or "", "edge"))
        except TopicError as exc:
            raise DecodeError(str(exc)) from None
