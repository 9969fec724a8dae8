"""The conntrack mark of connections on the shared enclave subnet, and the label ids in it.

MARK LAYOUT (32 bits; the labeller sets the first packet's mark and a rule after the
queue copies it to the connection: `ct mark set meta mark`)::

    bits  0-15   originator label: the end that opened the connection (ip saddr of
                 its first packet)
    bits 16-31   responder label: the end that accepted it (ip daddr)

    label 0x0000 NONE     not an enclave: an external host, the gateway itself
    label 0xFFFF UNKNOWN  an address of the shared subnet that no admitted enclave
                          holds (stale, spoofed, not yet leased): no rule names it
    label 1..N            an admitted enclave, N <= 0xFFFE (see below)

Every queued connection has an end on the shared subnet, and that end's label is an
enclave's or UNKNOWN (or NONE for the gateway's own address there), so an enclave's
connection never has mark 0: `ct mark 0` means the labeller did not see it, and no
compiled rule for an enclave matches it (fail closed).

Label ids are the policy's (`seng_fw.policy.labels`): a pure function of the policy, so the
compiler and the labeller agree without talking.
"""

from __future__ import annotations

from typing import Final

from seng_fw.policy.labels import (
    MAX_ID,
    NONE,
    UNKNOWN,
    AppLabels,
    Interval,
    LabelInfo,
    LabelTable,
    merge,
)

# The label ids' names, for the labeller's modules and tests.
__all__ = [
    "MAX_ID",
    "NONE",
    "UNKNOWN",
    "AppLabels",
    "Interval",
    "LabelInfo",
    "LabelTable",
    "as_responder",
    "decode",
    "encode",
    "is_labelled",
    "merge",
]
ORIGINATOR_MASK: Final = 0x0000FFFF
RESPONDER_MASK: Final = 0xFFFF0000
RESPONDER_SHIFT: Final = 16
# nft expressions of the two halves (key fields of type `mark` in compiled sets).
ORIGINATOR_EXPR: Final = "ct mark & 0x0000ffff"
RESPONDER_EXPR: Final = "ct mark & 0xffff0000"


def encode(originator: int, responder: int) -> int:
    """The mark of a connection from label `originator` to label `responder`."""
    if not (0 <= originator <= UNKNOWN and 0 <= responder <= UNKNOWN):
        raise ValueError(f"labels are 16-bit: {originator:#x}, {responder:#x}")
    return (responder << RESPONDER_SHIFT) | originator


def decode(mark: int) -> tuple[int, int]:
    """(originator, responder) labels of a mark."""
    return mark & ORIGINATOR_MASK, (mark & RESPONDER_MASK) >> RESPONDER_SHIFT


def is_labelled(mark: int) -> bool:
    return mark != 0


def as_responder(interval: Interval) -> Interval:
    """A range of label ids as the values of `ct mark & 0xffff0000` (responder side)."""
    low, high = interval
    return low << RESPONDER_SHIFT, high << RESPONDER_SHIFT


