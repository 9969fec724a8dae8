"""The SENG setup state machines (no I/O)."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from seng_fw.tunnel.messages import IpAssignAck, IpAssignment
from seng_fw.tunnel.setup import ClientSetup, ServerSetup, ServerSetupState, SetupFailed

ASSIGNMENT = IpAssignment(
    IPv4Address("192.168.28.2"), IPv4Address("255.255.255.0"), IPv4Address("192.168.28.1")
)


def test_assignment_resent_until_acknowledged() -> None:
    server = ServerSetup(ASSIGNMENT, now=0.0, resend_interval=1.0, attempts=3)
    assert server.records_due(0.0) == [ASSIGNMENT.encode()]
    assert server.records_due(0.5) == []  # not yet due
    assert server.next_timeout() == 1.0
    assert server.records_due(1.0) == [ASSIGNMENT.encode()]  # first copy "lost"
    server.receive_ack(IpAssignAck(ASSIGNMENT.ip).encode())
    assert server.state is ServerSetupState.ACKNOWLEDGED
    assert server.next_timeout() is None
    assert server.records_due(5.0) == []


def test_resends_are_bounded() -> None:
    server = ServerSetup(ASSIGNMENT, now=0.0, resend_interval=1.0, attempts=2)
    assert server.records_due(0.0)
    assert server.records_due(1.0)
    with pytest.raises(SetupFailed) as failure:
        server.records_due(2.0)
    assert failure.value.check == "assignment_unacknowledged"


def test_ack_for_another_address_fails_closed() -> None:
    server = ServerSetup(ASSIGNMENT, now=0.0, resend_interval=1.0, attempts=2)
    with pytest.raises(SetupFailed) as failure:
        server.receive_ack(IpAssignAck(IPv4Address("192.168.28.3")).encode())
    assert failure.value.check == "wrong_ack"
    assert server.state is ServerSetupState.AWAITING_ACK


def test_garbage_during_setup_fails() -> None:
    server = ServerSetup(ASSIGNMENT, now=0.0, resend_interval=1.0, attempts=2)
    with pytest.raises(SetupFailed) as failure:
        server.receive_ack(b"\xff\xff")
    assert failure.value.check == "bad_setup_message"


def test_implicit_ack_stops_resending() -> None:
    server = ServerSetup(ASSIGNMENT, now=0.0, resend_interval=1.0, attempts=2)
    server.records_due(0.0)
    server.acknowledge_implicitly()
    assert server.records_due(10.0) == []


def test_client_acknowledges_every_copy() -> None:
    client = ClientSetup()
    ack = IpAssignAck(ASSIGNMENT.ip).encode()
    assert client.receive_record(ASSIGNMENT.encode()) == [ack]
    assert client.assignment == ASSIGNMENT
    assert client.receive_record(ASSIGNMENT.encode()) == [ack]  # a resend: ACK again
    assert client.receive_record(b"\x45\x00") == []  # not a setup message: ignored


def test_client_refuses_conflicting_assignment() -> None:
    client = ClientSetup()
    client.receive_record(ASSIGNMENT.encode())
    other = IpAssignment(IPv4Address("192.168.28.9"), ASSIGNMENT.netmask, ASSIGNMENT.gateway)
    with pytest.raises(SetupFailed):
        client.receive_record(other.encode())


def test_client_refuses_garbage_before_assignment() -> None:
    with pytest.raises(SetupFailed):
        ClientSetup().receive_record(b"\x45\x00\x00\x14")
