"""Typed errors for everything that crosses the bus.

Receivers catch :class:`WireError`, count it by class name and keep running;
the class name is what shows up in metrics, so keep names stable.
"""


class WireError(ValueError):
    """Base class: the bytes or the message were not acceptable."""


class DecodeError(WireError):
    """The payload is not valid msgpack or not the expected structure."""


class SchemaVersionError(WireError):
    """The envelope carries a schema version this code does not speak."""


class UnknownKindError(WireError):
    """The envelope's kind is not the one the topic or caller expects."""


class UnknownModalityError(WireError):
    """A feature record names a modality that is malformed or not allowed."""


class ArrayFormatError(WireError):
    """An array's dtype, shape and byte length do not agree."""


class OversizeError(WireError):
    """A payload or array exceeds the configured size limit."""


class ChunkError(WireError):
    """A chunk is malformed, inconsistent with its transfer, or fails its hash."""


class ChunkHashError(ChunkError):
    """The reassembled transfer does not match the announced sha256."""


class ChunkLimitError(ChunkError):
    """Accepting this chunk would exceed the reassembler's memory bounds."""


class TopicError(WireError):
    """A topic string is not part of the megace topic tree."""
