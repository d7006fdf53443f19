"""What makes the platform's Kafka records readable by anyone: headers and the descriptor set.

Every record value is a protobuf message and carries two headers (`record_headers`):
`content-type: application/x-protobuf` and `message-type: <full message name>`, e.g.
`rlhf.v1.GenerationRecord`. The serialized `FileDescriptorSet` of protos/ (imports and comments
included) ships in the package; `rlhf schema` prints its path. With those two, a consumer in any
language builds the message class from the set and decodes the value, without this code:

    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(open(path, "rb").read()).file:
        pool.Add(file)
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(headers["message-type"]))
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

import services.genproto

CONTENT_TYPE = "application/x-protobuf"
HEADER_CONTENT_TYPE = "content-type"
HEADER_MESSAGE_TYPE = "message-type"
"""Header with the value's full protobuf message name."""

DESCRIPTOR_SET = Path(services.genproto.__file__).parent / "rlhf-v1.binpb"
"""The FileDescriptorSet written by `make proto` (protos/generate.py)."""


class SchemaError(ValueError):
    """A record that does not say what it holds, or names a message the set lacks."""


def record_headers(message: Message) -> list[tuple[str, bytes]]:
    """The headers that make a record self-describing: its content type and message name."""
    return [
        (HEADER_CONTENT_TYPE, CONTENT_TYPE.encode()),
        (HEADER_MESSAGE_TYPE, message.DESCRIPTOR.full_name.encode()),
    ]


def descriptor_set_path() -> Path:
    if not DESCRIPTOR_SET.is_file():
        raise FileNotFoundError(f"{DESCRIPTOR_SET} is missing: run `make proto`")
    return DESCRIPTOR_SET


@cache
def _pool(path: Path) -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes()).file:
        pool.Add(file)
    return pool


def message_class(full_name: str, path: Path | None = None) -> type[Message]:
    """The message class named `full_name`, built from the descriptor set alone."""
    pool = _pool(path or descriptor_set_path())
    try:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))
    except KeyError as err:
        raise SchemaError(f"the descriptor set has no message {full_name!r}") from err


def decode_record(
    headers: Iterable[tuple[str, bytes]], value: bytes, path: Path | None = None
) -> Message:
    """A record's value decoded by what its headers say (no generated code needed)."""
    found = {k: v.decode(errors="replace") for k, v in headers or ()}
    if found.get(HEADER_CONTENT_TYPE) != CONTENT_TYPE:
        raise SchemaError(f"content-type is {found.get(HEADER_CONTENT_TYPE)!r}, not {CONTENT_TYPE}")
    if HEADER_MESSAGE_TYPE not in found:
        raise SchemaError(f"the record has no {HEADER_MESSAGE_TYPE} header")
    return message_class(found[HEADER_MESSAGE_TYPE], path).FromString(value)
