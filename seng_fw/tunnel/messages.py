"""The SENG setup messages (protobuf proto2, package `seng_proto`), byte-compatible with
the original SENG server and clients.

The descriptor is built at import time with protobuf's own runtime instead of shipping
generated `_pb2` code: two messages of three fields do not justify a protoc build step,
and the protobuf library still does all encoding, decoding and required-field checks.

Addresses travel as the x86 `s_addr` of the address: its four network-order bytes read
as a little-endian integer (192.168.28.2 -> 0x021ca8c0).
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError


class SetupMessageError(ValueError):
    """A setup message that does not decode (malformed, missing a required field)."""


def _build_message_classes() -> tuple[Any, Any]:
    proto = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="seng_fw/seng.proto", package="seng_proto", syntax="proto2"
    )
    for name, fields in (("IpAssignment", ("ip", "netmask", "gw_ip")), ("IpAssignACK", ("ip",))):
        message = file.message_type.add(name=name)
        for number, field_name in enumerate(fields, start=1):
            message.field.add(
                name=field_name, number=number, type=proto.TYPE_UINT32, label=proto.LABEL_REQUIRED
            )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("seng_proto.IpAssignment")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("seng_proto.IpAssignACK")),
    )


_IpAssignmentPb, _IpAssignAckPb = _build_message_classes()


def to_s_addr(address: IPv4Address) -> int:
    return int.from_bytes(address.packed, "little")


def from_s_addr(value: int) -> IPv4Address:
    return IPv4Address(value.to_bytes(4, "little"))


def _parse(message_class: Any, data: bytes) -> Any:
    message = message_class()
    name = message_class.DESCRIPTOR.name
    try:
        message.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise SetupMessageError(f"malformed {name}: {exc}") from exc
    # The upb runtime parses partial messages; proto2 `required` is checked here.
    if not message.IsInitialized():
        missing = ", ".join(message.FindInitializationErrors())
        raise SetupMessageError(f"{name} lacks required field(s): {missing}")
    return message


@dataclass(frozen=True)
class IpAssignment:
    ip: IPv4Address
    netmask: IPv4Address
    gateway: IPv4Address

    def encode(self) -> bytes:
        message = _IpAssignmentPb(
            ip=to_s_addr(self.ip), netmask=to_s_addr(self.netmask), gw_ip=to_s_addr(self.gateway)
        )
        data: bytes = message.SerializeToString()
        return data

    @classmethod
    def decode(cls, data: bytes) -> IpAssignment:
        message = _parse(_IpAssignmentPb, data)
        return cls(
            from_s_addr(message.ip), from_s_addr(message.netmask), from_s_addr(message.gw_ip)
        )


@dataclass(frozen=True)
class IpAssignAck:
    ip: IPv4Address

    def encode(self) -> bytes:
        data: bytes = _IpAssignAckPb(ip=to_s_addr(self.ip)).SerializeToString()
        return data

    @classmethod
    def decode(cls, data: bytes) -> IpAssignAck:
        return cls(from_s_addr(_parse(_IpAssignAckPb, data).ip))
