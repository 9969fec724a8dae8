"""`GatewayCore` driven in memory with real DTLS sessions and lab-CA RA-TLS certificates
(tests/support/gateway_memory.py): admission and its refusals, pairing, the setup
exchange, the data path both ways, reconnects, timeouts, revocation and reload. No root."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from seng_fw.attest.identity import Check
from seng_fw.gateway.config import TimeoutConfig
from seng_fw.gateway.core import (
    AddressReleased,
    EnclaveAdmitted,
    EnclaveEnded,
    HandshakeCompleted,
    Port,
)
from seng_fw.gateway.counters import Drop, EndKind, Refusal, RejectReason, Revoked, Traffic
from seng_fw.policy.admission import Admission, AdmissionCheck
from seng_fw.policy.ipam import EnclaveSubnet, Ipam
from seng_fw.policy.models import Policy
from tests.support.gateway_memory import MemoryGateway, ipv4_packet, other_ca

WEBAPP, NGINX, UNKNOWN = bytes([1]) * 32, bytes([2]) * 32, bytes([3]) * 32
EXTERNAL = IPv4Address("10.77.2.2")


def policy(**overrides: Any) -> dict[str, Any]:
    webapp = {"name": "webapp", "mrenclave": WEBAPP.hex(), "hosts": ["10.0.0.0/24"],
              "subnet": {"subnet": "192.168.29.0/24"}}  # fmt: skip
    nginx = {"name": "nginx", "mrenclave": NGINX.hex(), "hosts": ["10.0.0.0/24"],
             "subnet": {"subnet": "192.168.30.0/30"}}  # one enclave address  # fmt: skip
    webapp.update(overrides)
    return {"apps": [webapp, nginx]}


@pytest.fixture
def gateway() -> MemoryGateway:
    return MemoryGateway(policy())


def ended_reasons(gateway: MemoryGateway) -> list[str]:
    return [str(event.reason) for event in gateway.events_of(EnclaveEnded)]


# ----- admission ---------------------------------------------------------------------


def test_an_attested_enclave_is_admitted_leased_and_paired(gateway: MemoryGateway) -> None:
    enclave = gateway.enclave(gateway.cert(WEBAPP)).connect()
    assert enclave.address in IPv4Network("192.168.29.0/24")
    assert enclave.assignment is not None
    assert enclave.assignment.gateway == IPv4Address("192.168.29.1")
    [admitted] = gateway.events_of(EnclaveAdmitted)
    assert admitted.enclave.app.name == "webapp"
    assert admitted.enclave.address == enclave.address
    [live] = gateway.core.enclaves
    assert live.downlink is not None  # tunnel #2 paired
    assert gateway.core.counters.admitted == 1
    # One handshake per tunnel, each reported with its duration.
    handshakes = gateway.events_of(HandshakeCompleted)
    assert [h.port for h in handshakes] == [Port.SETUP, Port.DOWNLINK]
    assert all(h.seconds >= 0 for h in handshakes)


@pytest.mark.parametrize(
    ("cert_args", "host", "check"),
    [
        ({"mrenclave": UNKNOWN}, "10.0.0.10", AdmissionCheck.UNKNOWN_MRENCLAVE),
        ({"mrenclave": WEBAPP}, "10.9.9.9", AdmissionCheck.HOST_NOT_ALLOWED),
        ({"mrenclave": WEBAPP, "debug": True}, "10.0.0.10", AdmissionCheck.DEBUG_ENCLAVE),
        (
            {"mrenclave": WEBAPP, "mrsigner": bytes(32)},
            "10.0.0.10",
            AdmissionCheck.MRSIGNER_MISMATCH,
        ),
        ({"mrenclave": WEBAPP, "status": "GROUP_REVOKED"}, "10.0.0.10", Check.QUOTE_STATUS),
    ],
)
def test_refusals_close_the_tunnel_and_count_the_check(
    cert_args: dict[str, Any], host: str, check: RejectReason
) -> None:
    gateway = MemoryGateway(policy(mrsigner=(bytes([0xCD]) * 32).hex()))
    enclave = gateway.enclave(gateway.cert(**cert_args), host=host)
    uplink = enclave.open_uplink()
    gateway.pump()
    assert gateway.core.counters.rejected[check] == 1
    assert enclave.assignment is None
    assert uplink.session.closed  # close_notify reached the client
    assert gateway.events_of(EnclaveAdmitted) == []
    assert gateway.core.enclaves == []


def test_an_untrusted_attestation_root_is_refused() -> None:
    gateway = MemoryGateway(policy())
    enclave = gateway.enclave(gateway.cert(WEBAPP, ca=other_ca()))
    enclave.open_uplink()
    gateway.pump()
    assert gateway.core.counters.rejected[Check.UNTRUSTED_ROOT] == 1
    assert gateway.core.enclaves == []


def test_a_full_pool_refuses_and_a_released_address_waits_for_its_flush(
    gateway: MemoryGateway,
) -> None:
    gateway.flush_released = False
    first = gateway.enclave(gateway.cert(NGINX)).connect()
    assert first.address == IPv4Address("192.168.30.2")
    second = gateway.enclave(gateway.cert(NGINX), host="10.0.0.11")
    second.open_uplink()
    gateway.pump()
    assert gateway.core.counters.rejected[Refusal.POOL_EXHAUSTED] == 1
    # The first one leaves: its address is released, but not leased again before the
    # adapter confirms that its conntrack entries are gone.
    gateway.core.revoke(lambda e: True, EndKind.SHUTDOWN, gateway.now)
    gateway.pump()
    [released] = gateway.events_of(AddressReleased)
    assert released.address == first.address
    third = gateway.enclave(gateway.cert(NGINX), host="10.0.0.12")
    third.open_uplink()
    gateway.pump()
    assert gateway.core.counters.rejected[Refusal.POOL_EXHAUSTED] == 2
    gateway.core.address_flushed(released.address)
    gateway.enclave(gateway.cert(NGINX), host="10.0.0.13").connect()
    assert [e.enclave.address for e in gateway.events_of(EnclaveAdmitted)][-1] == first.address


# ----- pairing and the setup exchange ------------------------------------------------


def test_tunnel_2_without_tunnel_1_is_refused(gateway: MemoryGateway) -> None:
    enclave = gateway.enclave(gateway.cert(WEBAPP))
    downlink = enclave.open_downlink()
    gateway.pump()
    assert gateway.core.counters.rejected[Refusal.UNPAIRED_DOWNLINK] == 1
    assert downlink.session.closed


def test_tunnel_2_of_another_enclave_does_not_pair(gateway: MemoryGateway) -> None:
    enclave = gateway.enclave(gateway.cert(WEBAPP))
    enclave.open_uplink()
    gateway.pump()
    # Same app, same host, but other evidence (another certificate): not its tunnel #2.
    impostor = gateway.enclave(gateway.cert(WEBAPP))
    impostor.open_downlink()
    gateway.pump()
    assert gateway.core.counters.rejected[Refusal.UNPAIRED_DOWNLINK] == 1
    assert gateway.core.enclaves[0].downlink is None


def test_pairing_times_out_and_releases_the_address() -> None:
    gateway = MemoryGateway(policy(), timeouts=TimeoutConfig(pairing=5, assignment_attempts=20))
    enclave = gateway.enclave(gateway.cert(WEBAPP))
    enclave.open_uplink()
    gateway.pump()
    address = enclave.address
    gateway.advance(4)
    assert ended_reasons(gateway) == []
    gateway.advance(2)
    assert ended_reasons(gateway) == ["pairing_timeout"]
    assert [e.address for e in gateway.events_of(AddressReleased)] == [address]
    assert gateway.core.enclaves == []
    assert enclave.uplink is not None and enclave.uplink.session.closed


def test_the_ip_assignment_is_resent_until_acknowledged(gateway: MemoryGateway) -> None:
    enclave = gateway.enclave(gateway.cert(WEBAPP))
    enclave.auto_ack = False  # the ACKs are lost
    enclave.open_uplink()
    gateway.pump()
    assert enclave.assignments_received == 1
    gateway.advance(3)
    assert enclave.assignments_received == 4  # every second, the same assignment
    enclave.auto_ack = True
    gateway.advance(1)
    count = enclave.assignments_received
    gateway.advance(5)
    assert enclave.assignments_received == count  # acknowledged: no more resends


def test_an_unacknowledged_assignment_ends_the_enclave() -> None:
    gateway = MemoryGateway(policy(), timeouts=TimeoutConfig(assignment_attempts=3))
    enclave = gateway.enclave(gateway.cert(WEBAPP))
    enclave.auto_ack = False
    enclave.open_uplink()
    gateway.pump()
    gateway.advance(5)
    assert enclave.assignments_received == 3
    assert ended_reasons(gateway) == ["assignment_unacknowledged"]


# ----- the data path ------------------------------------------------------------------


def test_packets_flow_both_ways_and_are_counted(gateway: MemoryGateway) -> None:
    enclave = gateway.enclave(gateway.cert(WEBAPP)).connect()
    up = ipv4_packet(enclave.address, EXTERNAL, 100)
    enclave.send(up)
    assert gateway.to_tun == [up]
    down = ipv4_packet(EXTERNAL, enclave.address, 60)
    gateway.from_tun(down)
    assert enclave.received == [down]
    traffic = gateway.core.enclaves[0].traffic
    assert traffic == Traffic(packets_in=1, bytes_in=100, packets_out=1, bytes_out=60)


def test_a_spoofed_source_is_dropped_and_counted(gateway: MemoryGateway) -> None:
    enclave = gateway.enclave(gateway.cert(WEBAPP)).connect()
    enclave.send(ipv4_packet("192.168.29.77", EXTERNAL))
    assert gateway.to_tun == []
    assert gateway.core.counters.dropped[Drop.SPOOFED] == 1
    assert gateway.core.enclaves[0].traffic.dropped_spoofed == 1


def test_tun_packets_for_nobody_are_dropped_and_counted(gateway: MemoryGateway) -> None:
    enclave = gateway.enclave(gateway.cert(WEBAPP)).connect()
    gateway.from_tun(ipv4_packet(EXTERNAL, "192.168.29.200"), b"\x60" + bytes(39))
    assert enclave.received == []
    assert gateway.core.counters.dropped[Drop.NO_ENCLAVE] == 1
    assert gateway.core.counters.dropped[Drop.TUN_NOT_IPV4] == 1


def test_garbage_from_an_unknown_address_gets_no_state(gateway: MemoryGateway) -> None:
    gateway.inject(Port.SETUP, ("10.0.0.66", 5555), b"\x17\xfe\xfd" + bytes(40))
    assert gateway.core.counters.dropped[Drop.NOT_CLIENT_HELLO] == 1
    assert gateway.core._peers == {}


# ----- reconnect, timeouts, revoke, reload ---------------------------------------------


def test_a_restarted_client_replaces_its_old_tunnels(gateway: MemoryGateway) -> None:
    enclave = gateway.enclave(gateway.cert(WEBAPP)).connect()
    old = gateway.core.enclaves[0]
    # The client restarts on the same UDP ports with fresh DTLS sessions.
    enclave.setup.assignment = None
    enclave.connect()
    assert "reconnected" in ended_reasons(gateway)
    [new] = gateway.core.enclaves
    assert new is not old and new.downlink is not None
    assert len(gateway.events_of(EnclaveAdmitted)) == 2
    enclave.send(ipv4_packet(enclave.address, EXTERNAL))
    assert len(gateway.to_tun) == 1


def test_an_idle_enclave_is_closed() -> None:
    gateway = MemoryGateway(policy(), timeouts=TimeoutConfig(idle=10))
    enclave = gateway.enclave(gateway.cert(WEBAPP)).connect()
    gateway.advance(6)
    enclave.send(ipv4_packet(enclave.address, EXTERNAL))  # activity resets the clock
    gateway.advance(6)
    assert ended_reasons(gateway) == []
    gateway.advance(5)
    assert ended_reasons(gateway) == ["idle_timeout"]
    assert enclave.uplink is not None and enclave.uplink.session.closed
    assert enclave.downlink is not None and enclave.downlink.session.closed


def test_revoke_closes_only_the_chosen_enclaves(gateway: MemoryGateway) -> None:
    web = gateway.enclave(gateway.cert(WEBAPP)).connect()
    nginx = gateway.enclave(gateway.cert(NGINX)).connect()
    revoked = Revoked(AdmissionCheck.REVOKED_BY_OPERATOR)
    closed = gateway.core.revoke(lambda e: e.app.name == "webapp", revoked, gateway.now)
    gateway.pump()
    assert closed == 1
    assert ended_reasons(gateway) == ["revoked.revoked_by_operator"]
    assert web.uplink is not None and "close_notify" in web.uplink.closed_reasons
    assert [e.app.name for e in gateway.core.enclaves] == ["nginx"]
    # Ended before its address is released (the labeller forgets it before the flush).
    kinds = [type(e) for e in gateway.events if isinstance(e, EnclaveEnded | AddressReleased)]
    assert kinds == [EnclaveEnded, AddressReleased]
    gateway.from_tun(ipv4_packet(EXTERNAL, nginx.address))
    assert len(nginx.received) == 1


def test_reload_closes_enclaves_the_new_policy_refuses_and_keeps_the_others(
    gateway: MemoryGateway,
) -> None:
    gateway.enclave(gateway.cert(WEBAPP)).connect()
    nginx = gateway.enclave(gateway.cert(NGINX)).connect()
    without_webapp = Policy.model_validate({"apps": policy()["apps"][1:]})
    gateway.core.reload(Admission(without_webapp), gateway.now)
    gateway.pump()
    assert ended_reasons(gateway) == ["revoked.unknown_mrenclave"]
    [kept] = gateway.core.enclaves
    assert kept.app.name == "nginx" and kept.app is without_webapp.app("nginx")
    gateway.from_tun(ipv4_packet(EXTERNAL, nginx.address))
    assert len(nginx.received) == 1
    # A new enclave of the removed app is refused now.
    gateway.enclave(gateway.cert(WEBAPP)).open_uplink()
    gateway.pump()
    assert gateway.core.counters.rejected[AdmissionCheck.UNKNOWN_MRENCLAVE] == 1


def test_reload_that_moves_a_subnet_closes_its_enclaves(gateway: MemoryGateway) -> None:
    gateway.enclave(gateway.cert(WEBAPP)).connect()
    moved = Policy.model_validate(policy(subnet={"subnet": "192.168.40.0/24"}))
    gateway.core.reload(Admission(moved), gateway.now)
    gateway.pump()
    assert ended_reasons(gateway) == ["revoked.subnet_changed"]
    enclave = gateway.enclave(gateway.cert(WEBAPP), host="10.0.0.20").connect()
    assert enclave.address in IPv4Network("192.168.40.0/24")


class RecordingLeases(Ipam[str]):
    """A lease store that records what the core asks of it (as a shared store would
    see it)."""

    def __init__(self, subnets: list[EnclaveSubnet]) -> None:
        super().__init__(subnets)
        self.calls: list[tuple[str, str]] = []

    def lease(self, network: IPv4Network | str, owner: str) -> IPv4Address:
        address = super().lease(network, owner)
        self.calls.append(("lease", str(address)))
        return address

    def release(self, address: IPv4Address) -> IPv4Address:
        self.calls.append(("release", str(address)))
        return super().release(address)


def test_leases_come_from_the_store_the_core_is_given() -> None:
    store = RecordingLeases([EnclaveSubnet.parse("192.168.29.0/24")])
    gateway = MemoryGateway(policy(), leases=store)
    enclave = gateway.enclave(gateway.cert(WEBAPP)).connect()
    assert store.calls == [("lease", str(enclave.address))]
    assert store.owner_of(enclave.address) == "webapp"
    gateway.core.revoke(lambda e: True, EndKind.SHUTDOWN, gateway.now)
    gateway.pump()
    assert store.calls[-1] == ("release", str(enclave.address))
    assert store.owner_of(enclave.address) is None
