"""UDP segmentation offloads for the tunnel sockets (issue 12, lever 3).

- GRO on receive (`UDP_GRO`): the kernel hands a socket several datagrams of one flow
  in one buffer, all `segment` bytes long but the last, which may be shorter; the
  segment size comes in a control message. One `recvmsg` then carries many records.
- GSO on send (`UDP_SEGMENT`): one `sendmsg` of equal-sized datagrams laid end to end,
  which the kernel cuts back into the same datagrams (on a veth pair, or a NIC with GRO,
  the far end's GRO socket gets them as one buffer again).

Every datagram cut out of a GRO buffer is then handled exactly as one received alone
(its records authenticated and replay-checked, its packets checked): GRO changes how
many system calls carry the datagrams, not what is accepted.
"""

from __future__ import annotations

import socket
import struct
import sys

UDP_SEGMENT = 103  # linux/udp.h: socket option and control message (SOL_UDP)
UDP_GRO = 104
SOL_UDP = getattr(socket, "SOL_UDP", 17)
GRO_ANCILLARY = socket.CMSG_SPACE(4)  # one int: the segment size
MAX_GSO_SEGMENTS = 64  # UDP_MAX_SEGMENTS of older kernels
MAX_GSO_BYTES = 65000  # what one UDP datagram (before cutting) can carry, with headers
_INT = struct.Struct("=i")


def enable_gro(sock: socket.socket) -> bool:
    """Ask for GRO on `sock`; False if this kernel does not have it (then plain recv)."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def gro_segment(ancillary: list[tuple[int, int, bytes]]) -> int:
    """The segment size from a GRO recvmsg's control messages; 0 if there is none (the
    buffer is one datagram)."""
    for level, kind, data in ancillary:
        if level == SOL_UDP and kind == UDP_GRO and len(data) >= _INT.size:
            return int(_INT.unpack_from(data)[0])
    return 0


def split(total: int, segment: int) -> list[tuple[int, int]]:
    """(start, end) of each datagram in a GRO buffer of `total` bytes cut every
    `segment` bytes; the whole buffer if `segment` does not cut it (0, or >= total)."""
    if segment <= 0 or segment >= total:
        return [(0, total)]
    return [(start, min(start + segment, total)) for start in range(0, total, segment)]


def gso_runs(sizes: list[int]) -> list[tuple[int, int]]:
    """(first, last + 1) index ranges of `sizes` that one GSO send each can carry: equal
    sizes (the last of a run may be shorter), at most MAX_GSO_SEGMENTS datagrams and
    MAX_GSO_BYTES bytes."""
    runs: list[tuple[int, int]] = []
    i, count = 0, len(sizes)
    while i < count:
        size = sizes[i]
        limit = min(MAX_GSO_SEGMENTS, max(1, MAX_GSO_BYTES // max(1, size)))
        j = i + 1
        while j < count and j - i < limit and sizes[j] == size:
            j += 1
        if j < count and j - i < limit and sizes[j] < size:
            j += 1  # a shorter datagram may end the run
        runs.append((i, j))
        i = j
    return runs


def gso_control(segment: int) -> list[tuple[int, int, bytes]]:
    """The control message of a GSO send cut every `segment` bytes."""
    return [(SOL_UDP, UDP_SEGMENT, segment.to_bytes(2, sys.byteorder))]
