"""SENG setup on tunnel #1, both sides, free of I/O.

After the DTLS handshake and admission the gateway sends `IpAssignment` and the enclave
answers `IpAssignACK`. The original server sent the assignment once; DTLS does not
retransmit application records, so a lost datagram stalled the enclave. Here the gateway
resends the identical assignment until it is acknowledged (a bounded number of times),
and the client acknowledges every copy: the message format is unchanged.

The gateway also accepts two implicit acknowledgements, because the ACK itself can be
lost while the client has moved on: tunnel #2 being paired, and an IPv4 packet on tunnel
#1 from the assigned address. (An `IpAssignACK` starts with byte 0x08, an IPv4 packet
with 0x4?, so the two cannot be confused.)
"""

from __future__ import annotations

import enum

from seng_fw.tunnel.messages import IpAssignAck, IpAssignment, SetupMessageError


class SetupCheck(enum.StrEnum):
    """Why a setup exchange failed (for logs and counters)."""

    ASSIGNMENT_UNACKNOWLEDGED = "assignment_unacknowledged"
    BAD_SETUP_MESSAGE = "bad_setup_message"
    WRONG_ACK = "wrong_ack"
    CONFLICTING_ASSIGNMENT = "conflicting_assignment"


class SetupFailed(Exception):
    """The setup exchange cannot complete; `check` names why (for logs and counters)."""

    def __init__(self, check: SetupCheck, message: str) -> None:
        super().__init__(f"{check}: {message}")
        self.check = check


class ServerSetupState(enum.Enum):
    AWAITING_ACK = "awaiting_ack"
    ACKNOWLEDGED = "acknowledged"


class ServerSetup:
    """The gateway's side: deliver one `IpAssignment` reliably."""

    def __init__(
        self, assignment: IpAssignment, now: float, resend_interval: float, attempts: int
    ) -> None:
        self.assignment = assignment
        self.state = ServerSetupState.AWAITING_ACK
        self._record = assignment.encode()
        self._resend_interval = resend_interval
        self._attempts_left = attempts
        self._next_send = now

    def next_timeout(self) -> float | None:
        return self._next_send if self.state is ServerSetupState.AWAITING_ACK else None

    def records_due(self, now: float) -> list[bytes]:
        """The assignment record(s) to send now; raises SetupFailed when attempts run out."""
        if self.state is not ServerSetupState.AWAITING_ACK or now < self._next_send:
            return []
        if self._attempts_left == 0:
            raise SetupFailed(
                SetupCheck.ASSIGNMENT_UNACKNOWLEDGED, "no IpAssignACK after every resend"
            )
        self._attempts_left -= 1
        self._next_send = now + self._resend_interval
        return [self._record]

    def receive_ack(self, record: bytes) -> None:
        """A non-IPv4 record on tunnel #1 during setup: it must be the matching ACK."""
        try:
            ack = IpAssignAck.decode(record)
        except SetupMessageError as exc:
            raise SetupFailed(SetupCheck.BAD_SETUP_MESSAGE, str(exc)) from exc
        if ack.ip != self.assignment.ip:
            raise SetupFailed(
                SetupCheck.WRONG_ACK, f"IpAssignACK for {ack.ip}, assigned {self.assignment.ip}"
            )
        self.state = ServerSetupState.ACKNOWLEDGED

    def acknowledge_implicitly(self) -> None:
        """Tunnel #2 paired, or traffic arrived from the assigned address."""
        self.state = ServerSetupState.ACKNOWLEDGED


class ClientSetup:
    """The enclave's side: take the first `IpAssignment`, acknowledge every copy of it."""

    def __init__(self) -> None:
        self.assignment: IpAssignment | None = None

    def receive_record(self, record: bytes) -> list[bytes]:
        """Records to send back (the ACK). Raises SetupFailed on a conflicting assignment."""
        try:
            assignment = IpAssignment.decode(record)
        except SetupMessageError as exc:
            if self.assignment is None:
                raise SetupFailed(SetupCheck.BAD_SETUP_MESSAGE, str(exc)) from exc
            return []  # after setup the gateway sends nothing else on tunnel #1: ignore
        if self.assignment is None:
            self.assignment = assignment
        elif assignment != self.assignment:
            raise SetupFailed(
                SetupCheck.CONFLICTING_ASSIGNMENT, f"got {assignment.ip} after {self.assignment.ip}"
            )
        return [IpAssignAck(assignment.ip).encode()]
