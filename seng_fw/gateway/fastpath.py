"""The per-packet data path of admitted, paired enclaves, outside the core (issue 12).

Through the core every packet cost an event object, a few Counter updates, several
calls and list appends (about 8 µs of Python per packet, profiled). Here:

- uplink: an enclave's own connected socket (`peersockets`) is drained by one loop:
  receive into a preallocated buffer, open the records with the session's record
  layer, check that each payload is one IPv4 packet whose source is the enclave's
  address, write it to the TUN device;
- downlink: TUN packets are looked up by destination in a dict of lanes and sealed
  with the record layer of the owning enclave's tunnel #2;
- counters are local integers added to the enclave's and the core's per batch.

Only the common case is handled here: established sessions, application-data records,
an enclave whose tunnel #2 is paired. Everything else (handshake records, alerts,
records that fail authentication or replay checks, unknown destinations, enclaves not
paired yet) goes to the session and the core as before, so protocol decisions (setup,
pairing, close, reconnect, alerts) stay in the sans-I/O core. The checks are the core's:
every record is authenticated and replay-checked by `RecordLayer.open`, every packet's
source address is the enclave's own (anti-spoofing) and its length is its record's.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from seng_fw.gateway.core import Enclave, GatewayCore, Port
from seng_fw.gateway.counters import Drop, Fault
from seng_fw.tunnel.dtls import DtlsServerSession
from seng_fw.tunnel.offload import VNET_NONE, coalesce_tcp4
from seng_fw.tunnel.record import CONTENT_APPLICATION_DATA, RecordLayer
from seng_fw.tunnel.tun import TUN_GONE_ERRNOS
from seng_fw.tunnel.udp_offload import GRO_ANCILLARY, gro_segment, split

log = logging.getLogger("seng_fw.gateway")

# What a UDP GSO send fails with where plain sends of the same datagrams work.
GSO_REFUSED_ERRNOS = frozenset({errno.EINVAL, errno.EIO, errno.EOPNOTSUPP, errno.EMSGSIZE})

BATCH = 64
MAX_DATAGRAM = 65535
# UDP GSO limits (linux/udp.h UDP_MAX_SEGMENTS; one IPv4 datagram's payload).
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65507
UDP_SEGMENT = 103  # socket option (SOL_UDP): the segment size of a GSO send
SendGso = Callable[[list[bytes], int, tuple[str, int]], object]


@dataclass(eq=False, slots=True)
class Lane:
    """What the downlink needs of one paired enclave, looked up by packed address."""

    enclave: Enclave
    records: RecordLayer  # tunnel #2's
    session: DtlsServerSession
    peer: tuple[str, int]
    max_packet: int


class FastPath:
    """Forwarding for paired enclaves; falls back to the core for everything else.

    `send_downlink` sends a datagram from port P+1 (the adapter's listener `sendto`);
    `send_gso`, where the kernel has UDP GSO (`gso_sender`), sends equal-sized
    datagrams (the last may be shorter) in one call; `tun_vnet_hdr`: the TUN device
    takes a virtio-net header before each packet (`TunDevice.vnet_hdr`); `tun_coalesce`
    (with it): an enclave's in-order TCP segments of one batch are written coalesced
    into super-packets (`offload.coalesce_tcp4`);
    `flush` is the adapter's: it sends what the core queued and acts on its events
    (called after a fallback handed the core work)."""

    def __init__(
        self,
        core: GatewayCore,
        tun_fd: int,
        send_downlink: Callable[[bytes, tuple[str, int]], object],
        flush: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
        tun_lost: Callable[[OSError], None] = lambda exc: None,
        send_gso: SendGso | None = None,
        tun_vnet_hdr: bool = False,
        tun_coalesce: bool = False,
    ) -> None:
        self.core = core
        self.tun_fd = tun_fd
        self._send_gso = send_gso
        self._gso_mtu_warned = False
        self._vnet_hdr = tun_vnet_hdr
        self._coalesce = tun_coalesce and tun_vnet_hdr
        self._tun_lost = tun_lost  # the adapter stops the gateway (exit 4)
        self._send = send_downlink
        self._flush = flush
        self._clock = clock
        self._buffer = bytearray(MAX_DATAGRAM)
        self._view = memoryview(self._buffer)
        self._buffers = [self._buffer]  # recvmsg_into's
        self._lanes: dict[bytes, Lane] = {}

    # ----- uplink: enclave -> gateway -> TUN ----------------------------------------

    def drain_uplink(self, sock: socket.socket, enclave: Enclave, gro: bool = False) -> None:
        """Read up to `BATCH` receives from an enclave's connected tunnel #1 socket; with
        `gro` (UDP GRO on the socket) each may carry several datagrams, cut apart here
        and handled one by one, as if received alone."""
        core = self.core
        session = enclave.uplink
        peer = enclave.uplink_peer
        now = self._clock()
        if enclave.downlink is None or session.record_layer is None:
            # Not paired yet (setup exchange) or closed: all of it is the core's.
            self._drain_to_core(sock, peer, now, gro)
            return
        recv_into, buffer, view = sock.recv_into, self._buffer, self._view
        recvmsg_into, buffers = sock.recvmsg_into, self._buffers
        write, writev, fd, vnet = os.write, os.writev, self.tun_fd, self._vnet_hdr
        address = enclave.address_bytes
        receive = session.receive_data
        packets = octets = spoofed = not_ipv4 = options = write_errors = 0
        drop_options = core.limits.ip_options == "drop"
        fallback = ended = False
        segment = 0
        coalesce = self._coalesce
        pending: list[bytes] = []  # checked TCP packets, written coalesced at the end
        for _ in range(BATCH):
            try:
                if gro:
                    n, ancillary, _flags, _address = recvmsg_into(buffers, GRO_ANCILLARY)
                    segment = gro_segment(ancillary) if ancillary else 0
                else:
                    n = recv_into(buffer)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # e.g. ICMP port unreachable reported on the socket
                log.debug("recv from %s:%d: %s", *peer, exc)
                continue
            for start, end in split(n, segment) if segment else ((0, n),):
                if start == end or buffer[start] != CONTENT_APPLICATION_DATA:
                    # Handshake records (a restarted enclave's ClientHello, a repeated
                    # Finished), alerts: the core's, which also feeds a reconnect
                    # candidate. The core may end the enclave: what came before is
                    # written and counted first.
                    self._fold_batch(enclave, now, pending, packets, octets, spoofed, not_ipv4,
                                     options, write_errors)  # fmt: skip
                    packets = octets = spoofed = not_ipv4 = options = write_errors = 0
                    self._to_core(peer, bytes(view[start:end]), now)
                    fallback = True
                    if session.record_layer is None:
                        ended = True
                        self._rest_to_core(n, segment, end, peer, now)
                        break
                    continue
                payloads = receive(view[start:end], now)
                if payloads is None:
                    # The session did more than decrypt (alert, handshake, drop): the
                    # core handles its events, as for a datagram it had received itself.
                    self._fold_batch(enclave, now, pending, packets, octets, spoofed, not_ipv4,
                                     options, write_errors)  # fmt: skip
                    packets = octets = spoofed = not_ipv4 = options = write_errors = 0
                    try:
                        core.session_activity(Port.SETUP, peer, now)
                    except Exception:
                        core.counters.faults[Fault.INTERNAL_ERROR_DATAGRAM] += 1
                        log.exception("internal error on a datagram from %s:%d", *peer)
                    fallback = True
                    if session.record_layer is None:
                        ended = True  # the session ended
                        self._rest_to_core(n, segment, end, peer, now)
                        break
                    continue
                for packet in payloads:
                    # One IPv4 packet per record (version, header and total length
                    # agree) from the enclave's own address: packets.is_ipv4 and
                    # packets.source, inlined.
                    size = len(packet)
                    first = packet[0]
                    if (
                        size < 20
                        or first >> 4 != 4
                        or not 20 <= (first & 0x0F) * 4 <= size
                        or (packet[2] << 8 | packet[3]) != size
                    ):
                        not_ipv4 += 1
                        continue
                    if packet[12:16] != address:
                        spoofed += 1
                        continue
                    if first != 0x45 and drop_options:
                        options += 1  # IP options: dropped, as the core does (core._record)
                        continue
                    if coalesce and packet[9] == 6:  # TCP: maybe merged; others need not wait
                        pending.append(packet)
                        packets += 1
                        octets += size
                        continue
                    try:
                        if vnet:
                            writev(fd, (VNET_NONE, packet))
                        else:
                            write(fd, packet)
                    except OSError as exc:  # as the adapter's TUN writes: counted
                        write_errors += 1
                        if exc.errno in TUN_GONE_ERRNOS:
                            self._tun_lost(exc)
                        continue
                    packets += 1
                    octets += size
            if ended:
                break
        self._fold_batch(enclave, now, pending, packets, octets, spoofed, not_ipv4, options,
                         write_errors)  # fmt: skip
        if fallback:
            self._flush()

    def _fold_batch(
        self,
        enclave: Enclave,
        now: float,
        pending: list[bytes],
        packets: int,
        octets: int,
        spoofed: int,
        not_ipv4: int,
        options: int,
        write_errors: int,
    ) -> None:
        """Write the batch's coalesced TCP segments (emptying `pending`; what fails
        comes off the forwarded counts) and fold the counts into the core's."""
        if pending:
            failed, failed_octets = self._write_pending(pending)
            pending.clear()
            packets, octets = packets - failed, octets - failed_octets
            write_errors += failed
        self._fold(enclave, now, packets, octets, spoofed, not_ipv4, options, write_errors)

    def _rest_to_core(
        self, total: int, segment: int, after: int, peer: tuple[str, int], now: float
    ) -> None:
        """The enclave's session ended inside a GRO buffer: the datagrams after it
        (e.g. a restarted enclave's repeated ClientHello) are the core's, as they would
        have been had they been received one by one."""
        if segment:
            for start, end in split(total, segment):
                if start >= after:
                    self._to_core(peer, bytes(self._view[start:end]), now)

    def _write_pending(self, pending: list[bytes]) -> tuple[int, int]:
        """Write a batch's checked packets to TUN, consecutive in-order TCP segments of
        a flow as one super-packet; returns the packets and octets that failed."""
        writev, fd = os.writev, self.tun_fd
        failed = failed_octets = 0
        for header, parts, count in coalesce_tcp4(pending):
            try:
                writev(fd, [header, *parts])
            except OSError as exc:  # as the adapter's TUN writes: counted
                failed += count
                # A merged write is the first packet's headers and all the payloads.
                failed_octets += len(parts[0]) * count + sum(len(p) for p in parts[1:])
                if exc.errno in TUN_GONE_ERRNOS:
                    self._tun_lost(exc)
        return failed, failed_octets

    def _fold(
        self,
        enclave: Enclave,
        now: float,
        packets: int,
        octets: int,
        spoofed: int,
        not_ipv4: int,
        options: int,
        write_errors: int,
    ) -> None:
        """Add a batch's plain-integer counts to the enclave's and the core's counters."""
        if packets:
            enclave.last_activity = now
            traffic = enclave.traffic
            traffic.packets_in += packets
            traffic.bytes_in += octets
        if spoofed or not_ipv4 or options or write_errors:
            dropped = self.core.counters.dropped
            dropped[Drop.SPOOFED] += spoofed
            enclave.traffic.dropped_spoofed += spoofed
            dropped[Drop.NOT_IPV4] += not_ipv4
            dropped[Drop.IP_OPTIONS] += options
            dropped[Drop.TUN_WRITE_ERROR] += write_errors

    def _drain_to_core(
        self, sock: socket.socket, peer: tuple[str, int], now: float, gro: bool
    ) -> None:
        for _ in range(BATCH):
            try:
                if gro:
                    n, ancillary, _flags, _address = sock.recvmsg_into(
                        self._buffers, GRO_ANCILLARY
                    )
                    data = bytes(self._view[:n])
                    segment = gro_segment(ancillary) if ancillary else 0
                else:
                    data, segment = sock.recv(MAX_DATAGRAM), 0
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.debug("recv from %s:%d: %s", *peer, exc)
                continue
            if not segment:
                self._to_core(peer, data, now)
                continue
            for start, end in split(len(data), segment):
                self._to_core(peer, data[start:end], now)
        self._flush()

    def _to_core(self, peer: tuple[str, int], data: bytes, now: float) -> None:
        core = self.core
        try:
            core.datagram_received(Port.SETUP, peer, data, now)
        except Exception:
            # One bad datagram must never stop the server from serving everyone else.
            core.counters.faults[Fault.INTERNAL_ERROR_DATAGRAM] += 1
            log.exception("internal error on a datagram from %s:%d", *peer)

    # ----- downlink: TUN -> gateway -> enclave --------------------------------------

    def tun_packets(self, batch: list[bytes]) -> None:
        """Seal each packet for the enclave owning its destination; the rest (no lane:
        unknown destination, enclave not paired, not IPv4, too big) goes to the core."""
        lanes = self._lanes
        rest: list[bytes] = []
        sealed: dict[Lane, list[bytes]] = {}
        octets: dict[Lane, int] = {}
        too_big = 0
        for packet in batch:
            lane = lanes.get(packet[16:20])
            if lane is None:
                lane = self._lane_for(packet)
                if lane is None:
                    rest.append(packet)
                    continue
            records = lane.records
            size = len(packet)
            if size > lane.max_packet:
                too_big += 1  # the TUN MTU is below it; someone raised it
                continue
            if records.closed or size < 20 or packet[0] >> 4 != 4:
                rest.append(packet)
                continue
            try:
                datagram = records.seal(packet)
            except Exception:  # sequence numbers used up: the session decides (it ends)
                rest.append(packet)
                continue
            out = sealed.get(lane)
            if out is None:
                sealed[lane] = [datagram]
                octets[lane] = size
            else:
                out.append(datagram)
                octets[lane] += size
        send_errors = 0
        for lane, datagrams in sealed.items():
            send_errors += self._send_all(datagrams, lane.peer)
            count = len(datagrams)
            traffic = lane.enclave.traffic
            traffic.packets_out += count
            traffic.bytes_out += octets[lane]
            lane.session.records_out += count
        if send_errors or too_big:
            # Too big: larger than tunnel #2's records can carry (someone raised the
            # TUN MTU); counted as a send error, the record could not be sent.
            self.core.counters.dropped[Drop.SEND_ERROR] += send_errors + too_big
        if rest:
            self.core.tun_packets(rest, self._clock())
            self._flush()

    def _send_all(self, datagrams: list[bytes], peer: tuple[str, int]) -> int:
        """Send one enclave's datagrams in order; returns how many failed. With UDP GSO,
        each run of equal-sized datagrams (the last of a run may be shorter) leaves in
        one sendmsg: one trip through the kernel's UDP/IP output and nftables instead
        of one per datagram; the kernel cuts it into the same datagrams. Runs are long
        when the TUN device hands out TSO super-packets (split into equal segments);
        without them a TUN read rarely found more than a few packets waiting and GSO
        alone did not pay (bench/RESULTS-datapath.md)."""
        sendto, gso = self._send, self._send_gso
        errors = 0
        if gso is None or len(datagrams) == 1:
            for datagram in datagrams:
                try:
                    sendto(datagram, peer)
                except OSError:
                    errors += 1
            return errors
        i, n = 0, len(datagrams)
        while i < n:
            size = len(datagrams[i])
            most = min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size)
            j = i + 1
            while j < n and j - i < most and len(datagrams[j]) == size:
                j += 1
            if j < n and j - i < most and len(datagrams[j]) < size:
                j += 1  # a shorter datagram may end the run
            try:
                if j - i == 1:
                    sendto(datagrams[i], peer)
                else:
                    gso(datagrams[i:j], size, peer)
            except OSError as exc:
                if j - i > 1 and exc.errno in GSO_REFUSED_ERRNOS:
                    errors += self._gso_refused(exc, datagrams[i:j], peer)
                else:
                    errors += j - i
            i = j
        return errors

    def _gso_refused(self, exc: OSError, run: list[bytes], peer: tuple[str, int]) -> int:
        """The kernel refused a GSO send that plain sends can make: EINVAL when a
        segment with its headers exceeds this path's MTU (the kernel fragments plain
        datagrams instead), EIO/EOPNOTSUPP when the route has no checksum offload
        (e.g. IPsec). The run goes one datagram at a time; on a route without the
        offload GSO is switched off. Returns how many failed."""
        if exc.errno != errno.EINVAL:
            self._send_gso = None
            log.warning("UDP GSO refused (%s): downlink records sent one by one", exc)
        elif not self._gso_mtu_warned:
            self._gso_mtu_warned = True
            log.warning(
                "UDP GSO refused towards %s:%d (%s; path MTU below the records?): "
                "such runs are sent one by one", *peer, exc
            )
        errors = 0
        for datagram in run:
            try:
                self._send(datagram, peer)
            except OSError:
                errors += 1
        return errors

    def _lane_for(self, packet: bytes) -> Lane | None:
        """A lane for the destination's enclave, once it is paired and established."""
        if len(packet) < 20:
            return None
        enclave = self.core.enclave_at(packet[16:20])
        if enclave is None or enclave.downlink is None or enclave.downlink_peer is None:
            return None
        session = enclave.downlink
        records = session.record_layer
        if records is None:
            return None
        lane = Lane(enclave, records, session, enclave.downlink_peer, session.max_record)
        self._lanes[enclave.address_bytes] = lane
        return lane

    def forget(self, enclave: Enclave) -> None:
        """The enclave ended: its lane goes (before its address can be leased again)."""
        lane = self._lanes.get(enclave.address_bytes)
        if lane is not None and lane.enclave is enclave:
            del self._lanes[enclave.address_bytes]

    def clear(self) -> None:
        self._lanes.clear()


def gso_sender(sock: socket.socket) -> SendGso | None:
    """A UDP GSO send on `sock` (sendmsg with a UDP_SEGMENT control message), or None
    where the kernel lacks UDP GSO (before Linux 4.18)."""
    try:
        sock.setsockopt(socket.SOL_UDP, UDP_SEGMENT, 0)  # 0: no GSO unless asked per send
    except OSError:
        return None
    sendmsg, level = sock.sendmsg, socket.SOL_UDP

    def send(datagrams: list[bytes], size: int, peer: tuple[str, int]) -> None:
        sendmsg(datagrams, [(level, UDP_SEGMENT, size.to_bytes(2, sys.byteorder))], 0, peer)

    return send
