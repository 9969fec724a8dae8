"""The one owner of a running gateway's policy, revocations and status.

`GatewayControl` answers what the control socket, signals and `seng-fw apply` ask of a
running `GatewayCore`: status, the enclave list, revocations and policy reloads; it runs
on the event loop and leaves the I/O to the adapter through its callbacks.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from ipaddress import IPv4Address
from typing import TYPE_CHECKING, Any

from seng_fw.attest.identity import EnclaveIdentity
from seng_fw.gateway.config import GatewayConfig
from seng_fw.gateway.counters import Traffic, by_reason
from seng_fw.policy.admission import Admission, AdmissionCheck, AdmissionRejected
from seng_fw.policy.models import App, Policy

if TYPE_CHECKING:
    from seng_fw.gateway.core import Enclave, GatewayCore

log = logging.getLogger("seng_fw.gateway.service")

# The admission check that refuses revoked enclaves: counted as rejected with this
# check and, for tunnels it closes, as ended with `Revoked(REVOKED_CHECK)`.
REVOKED_CHECK = AdmissionCheck.REVOKED_BY_OPERATOR


IDENTITY_EVIDENCE_KEYS = (
    "evidence",
    "quote_status",
    "tcb_status",
    "advisory_ids",
    "fmspc",
    "collateral_expires",
)


class ControlError(Exception):
    """A request the gateway refuses or cannot carry out; the text goes to the user."""


@dataclass(frozen=True, order=True)
class RevokedEnclave:
    """One revoked enclave instance, as it was when revoked."""

    address: str
    app: str
    host: str

    def __str__(self) -> str:
        return f"{self.address} (app {self.app}, host {self.host})"


@dataclass
class Revocations:
    """What the operator revoked: refused at admission, and their tunnels closed, until
    the gateway restarts or `seng-fw revoke --clear`. Policy reloads keep them."""

    apps: set[str] = field(default_factory=set)
    mrenclaves: set[bytes] = field(default_factory=set)
    # One enclave instance: its client host and attestation evidence. A restarted
    # enclave attests afresh and may come back (unless its app or MRENCLAVE is revoked).
    instances: dict[tuple[IPv4Address, EnclaveIdentity], RevokedEnclave] = field(
        default_factory=dict
    )

    def reason(self, app: str, identity: EnclaveIdentity, host: IPv4Address) -> str | None:
        if app in self.apps:
            return f"app {app} was revoked by the operator"
        if identity.mrenclave in self.mrenclaves:
            return f"MRENCLAVE {identity.mrenclave.hex()} was revoked by the operator"
        instance = self.instances.get((host, identity))
        if instance is not None:
            return f"enclave {instance} was revoked by the operator"
        return None

    def describe(self) -> list[str]:
        return [
            *(f"app {name}" for name in sorted(self.apps)),
            *(f"mrenclave {m.hex()}" for m in sorted(self.mrenclaves)),
            *(f"enclave {instance}" for instance in sorted(self.instances.values())),
        ]

    def to_json(self) -> list[dict[str, str]]:
        """Every revocation as an object with `kind` (app, mrenclave or enclave)."""
        return [
            *({"kind": "app", "app": name} for name in sorted(self.apps)),
            *({"kind": "mrenclave", "mrenclave": m.hex()} for m in sorted(self.mrenclaves)),
            *(
                {"kind": "enclave", **asdict(instance)}
                for instance in sorted(self.instances.values())
            ),
        ]

    def clear(self) -> int:
        count = len(self.apps) + len(self.mrenclaves) + len(self.instances)
        self.apps.clear()
        self.mrenclaves.clear()
        self.instances.clear()
        return count


class RevocableAdmission(Admission):
    """The policy's admission, minus what the operator revoked."""

    def __init__(self, policy: Policy, revocations: Revocations) -> None:
        super().__init__(policy)
        self.revocations = revocations

    def admit(self, identity: EnclaveIdentity, host: IPv4Address) -> App:
        app = super().admit(identity, host)
        reason = self.revocations.reason(app.name, identity, host)
        if reason is not None:
            raise AdmissionRejected(REVOKED_CHECK, reason)
        return app


@dataclass(frozen=True)
class AppTraffic:
    """One app's tunnel traffic since start-up (ended enclaves included)."""

    name: str
    enclaves: int  # active now
    packets_in: int  # enclave -> gateway (tunnel #1), written to the TUN device
    bytes_in: int
    packets_out: int  # TUN device -> enclave (tunnel #2)
    bytes_out: int
    dropped_spoofed: int  # from its enclaves with a source address not theirs


@dataclass(frozen=True)
class Snapshot:
    """The numbers behind `status` and the metrics, read on the event loop in one go."""

    started_at: float  # wall clock
    uptime: float
    admitted: int
    rejected: dict[str, int]  # by check (str of a RejectReason)
    ended: dict[str, int]  # by reason (str of an EndReason)
    dropped: dict[str, int]  # by Drop
    apps: list[AppTraffic]
    labeller: dict[str, int]
    firewall: dict[str, tuple[int, int]]  # nftables counters tx_APP / rx_APP
    policy_digest: str
    policy_applied_at: float  # wall clock
    half_open: int = 0  # handshakes past the cookie check, not completed
    half_open_sources: int = 0  # source addresses they come from
    handshakes_started: int = 0
    certificate_timeouts: int = 0  # half-open handshakes dropped without a certificate
    limits: dict[str, int] = field(default_factory=dict)  # hits by Limit


def policy_digest(policy: Policy) -> str:
    """SHA-256 of the parsed policy: the same for the same rules, whatever the comments."""

    def plain(value: object) -> str:
        return value.hex() if isinstance(value, bytes) else str(value)

    text = json.dumps(policy.model_dump(mode="python"), sort_keys=True, default=plain)
    return hashlib.sha256(text.encode()).hexdigest()


def _nothing() -> None:
    return None


def _no_queue() -> str:
    return "none"


def iso_time(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class GatewayControl:
    """`ControlHandler` over a running `GatewayCore`; all methods run on the event loop.

    `load_policy` reads the policy again (raises if it is invalid); `before_reload` gets
    the adapter ready for a new policy before it takes effect. `after_change` runs
    after tunnels were closed or subnets changed, so that the adapter sends the queued
    close_notify alerts, starts conntrack flushes and syncs the TUN addresses.
    """

    def __init__(
        self,
        core: GatewayCore,
        config: GatewayConfig,
        *,
        load_policy: Callable[[], Policy],
        before_reload: Callable[[Policy], Awaitable[None]] | None = None,
        after_change: Callable[[], None] = _nothing,
        queue_mode: Callable[[], str] = _no_queue,
        firewall_counters: Callable[[], Mapping[str, tuple[int, int]]] | None = None,
        labeller_counters: Callable[[], Mapping[str, int]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.core = core
        self.config = config
        self.load_policy = load_policy
        self.before_reload = before_reload
        self.after_change = after_change
        self.queue_mode = queue_mode
        self.firewall_counters = firewall_counters
        self.labeller_counters = labeller_counters
        self._clock = clock
        self._wall = wall_clock
        self.revocations = Revocations()
        self.started = clock()
        self.started_at = wall_clock()
        self.policy_applied_at = self.started_at
        self._digest: tuple[Policy, str] | None = None
        self._reload_lock = asyncio.Lock()
        core.admission = self._admission()

    # --- policy ----------------------------------------------------------------------

    def _admission(self) -> RevocableAdmission:
        """The core's admission with our revocations (wrapped again if it was replaced)."""
        admission = self.core.admission
        if isinstance(admission, RevocableAdmission) and admission.revocations is self.revocations:
            return admission
        return RevocableAdmission(admission.policy, self.revocations)

    async def load_and_apply_policy(self) -> int:
        """Load the policy and apply it; raises if it is invalid and keeps the running
        one. Enclaves it no longer admits are closed; returns how many. The files are
        read and checked (and the digest taken) in a worker thread: a 10,000-app policy
        takes half a minute to load, and on the event loop that stalled every tunnel
        (and the watchdog) for as long. Reloads run one at a time."""
        async with self._reload_lock:
            policy, digest = await asyncio.to_thread(self._load_with_digest)
            if self.before_reload is not None:
                await self.before_reload(policy)
            before = len(self.core.enclaves)
            self.core.reload(RevocableAdmission(policy, self.revocations), self._clock())
            self._digest = (policy, digest)
            self.policy_applied_at = self._wall()
            return before - len(self.core.enclaves)

    def _load_with_digest(self) -> tuple[Policy, str]:
        policy = self.load_policy()
        return policy, policy_digest(policy)

    def policy_digest(self) -> str:
        policy = self.core.admission.policy
        if self._digest is None or self._digest[0] is not policy:
            self._digest = (policy, policy_digest(policy))
        return self._digest[1]

    # --- ControlHandler --------------------------------------------------------------

    async def reload(self) -> dict[str, Any]:
        """`seng-fw reload`, `systemctl reload` and SIGHUP."""
        try:
            closed = await self.load_and_apply_policy()
        except Exception as exc:
            detail = str(exc).replace("\n", "; ")
            log.error("policy reload failed, keeping the running policy: %s", detail)
            raise ControlError(f"policy not reloaded, the running one is kept:\n{exc}") from exc
        self.after_change()
        after = len(self.core.enclaves)
        log.info("policy reloaded: %d enclaves remain, %d closed", after, closed)
        return {
            "policy": str(self.config.policy),
            "digest": self.policy_digest(),
            "apps": len(self.core.admission.policy.apps),
            "enclaves": after,
            "closed": closed,
        }

    def revoke(
        self,
        *,
        app: str | None = None,
        address: str | None = None,
        mrenclave: str | None = None,
        clear: bool = False,
    ) -> dict[str, Any]:
        given = [value for value in (app, address, mrenclave) if value is not None]
        if len(given) + clear != 1:
            raise ControlError("revoke: give exactly one of app, address, mrenclave or clear")
        if clear:
            count = self.revocations.clear()
            log.warning("revocations cleared (%d)", count)
            return {"cleared": count, "ended": []}
        what, document = self._add_revocation(app, address, mrenclave)
        before = self.core.enclaves
        # The core closes the tunnels of every enclave that its admission now refuses.
        self.core.reload(self._admission(), self._clock(), cause="revocation")
        remaining = set(self.core.enclaves)
        ended = [enclave for enclave in before if enclave not in remaining]
        self.after_change()
        log.warning(
            "revocation: revoked %s: %d enclaves closed", what, len(ended),
            extra={"event": "revocation", "revoked": document, "closed": len(ended)},
        )  # fmt: skip
        now, wall = self._clock(), self._wall()
        return {"revoked": document, "ended": [self._record(e, now, wall) for e in ended]}

    def _add_revocation(
        self, app: str | None, address: str | None, mrenclave: str | None
    ) -> tuple[str, dict[str, str]]:
        """The revocation added, for the log and as a Revocations.to_json() object."""
        if app is not None:
            if app not in {known.name for known in self.core.admission.policy.apps}:
                raise ControlError(f"no app {app!r} in the running policy")
            self.revocations.apps.add(app)
            return f"app {app}", {"kind": "app", "app": app}
        if mrenclave is not None:
            text = mrenclave.strip().lower().removeprefix("0x")
            try:
                value = bytes.fromhex(text)
            except ValueError:
                value = b""
            if len(value) != 32:
                raise ControlError(f"MRENCLAVE must be 64 hex digits, got {mrenclave!r}")
            self.revocations.mrenclaves.add(value)
            return f"mrenclave {value.hex()}", {"kind": "mrenclave", "mrenclave": value.hex()}
        try:
            wanted = IPv4Address(address or "")
        except ValueError:
            raise ControlError(f"{address!r} is not an IPv4 address") from None
        for enclave in self.core.enclaves:
            if enclave.address == wanted:
                instance = RevokedEnclave(str(wanted), enclave.app.name, str(enclave.host))
                self.revocations.instances[(enclave.host, enclave.identity)] = instance
                return f"enclave {instance}", {"kind": "enclave", **asdict(instance)}
        raise ControlError(f"no enclave has address {wanted}")

    def enclaves(self) -> list[dict[str, Any]]:
        now, wall = self._clock(), self._wall()
        found = sorted(self.core.enclaves, key=lambda e: (e.app.name, e.address))
        return [self._record(enclave, now, wall) for enclave in found]

    @staticmethod
    def _record(enclave: Enclave, now: float, wall: float) -> dict[str, Any]:
        identity = enclave.identity
        evidence = identity.to_json()
        return {
            "address": str(enclave.address),
            "app": enclave.app.name,
            "mrenclave": identity.mrenclave.hex(),
            "mrsigner": identity.mrsigner.hex(),
            "isv_svn": identity.isv_svn,
            "debug": identity.debug,
            # evidence (epid/dcap), quote and TCB status, advisories, FMSPC, collateral expiry
            **{key: evidence[key] for key in IDENTITY_EVIDENCE_KEYS},
            "host": str(enclave.host),
            "since": iso_time(wall - (now - enclave.admitted_at)),
            "seconds": round(now - enclave.admitted_at, 1),
            "idle_seconds": round(now - enclave.last_activity, 1),
            "paired": enclave.downlink is not None,
            **enclave.traffic.as_dict(),
        }

    def snapshot(self) -> Snapshot:
        core = self.core
        counters = core.counters
        totals: dict[str, Traffic] = {app.name: Traffic() for app in core.admission.policy.apps}
        active: Counter[str] = Counter()
        for app_name, traffic in counters.ended_traffic.items():
            totals.setdefault(app_name, Traffic()).add(traffic)
        for enclave in core.enclaves:
            active[enclave.app.name] += 1
            totals.setdefault(enclave.app.name, Traffic()).add(enclave.traffic)
        return Snapshot(
            started_at=self.started_at,
            uptime=self._clock() - self.started,
            admitted=counters.admitted,
            rejected=by_reason(counters.rejected),
            ended=by_reason(counters.ended),
            dropped=by_reason(counters.dropped),
            apps=[
                AppTraffic(name, active[name], **traffic.as_dict())
                for name, traffic in totals.items()
            ],
            labeller=dict(self.labeller_counters()) if self.labeller_counters else {},
            firewall=self._firewall(),
            policy_digest=self.policy_digest(),
            policy_applied_at=self.policy_applied_at,
            half_open=len(core.handshakes),
            half_open_sources=core.handshakes.sources(),
            handshakes_started=counters.handshakes_started,
            certificate_timeouts=counters.certificate_timeouts,
            limits=by_reason(counters.limits),
        )

    def _firewall(self) -> dict[str, tuple[int, int]]:
        if self.firewall_counters is None:
            return {}
        try:
            return dict(self.firewall_counters())
        except Exception as exc:  # the status must not fail because nft did
            log.warning("cannot read the firewall counters: %s", exc)
            return {}

    def status(self) -> dict[str, Any]:
        snap = self.snapshot()
        config = self.config
        policy = self.core.admission.policy
        subnets = {app.name: str(policy.subnet_of(app).subnet) for app in policy.apps}
        apps = []
        for app in snap.apps:
            tx, rx = snap.firewall.get(f"tx_{app.name}"), snap.firewall.get(f"rx_{app.name}")
            apps.append(
                {
                    **asdict(app),
                    "subnet": subnets.get(app.name),  # None: no longer in the policy
                    "revoked": app.name in self.revocations.apps,
                    "firewall_tx": None if tx is None else {"packets": tx[0], "bytes": tx[1]},
                    "firewall_rx": None if rx is None else {"packets": rx[0], "bytes": rx[1]},
                }
            )
        host, port = config.listen.address, config.listen.port
        return {
            "pid": os.getpid(),
            "started_at": iso_time(snap.started_at),
            "uptime_seconds": round(snap.uptime, 1),
            "listen": [f"{host}:{port}", f"{host}:{port + 1}"],
            "mode": config.mode,
            "tun": {"name": config.tun.name, "mtu": config.tun.mtu},
            "queue_mode": self.queue_mode(),
            # shared mode: labelled, unknown_source, verdict_errors, queue drops...
            "labeller": snap.labeller,
            "control_socket": str(config.control.socket),
            "metrics": config.metrics.listen,
            "policy": {
                "file": str(config.policy),
                "digest": snap.policy_digest,
                "applied_at": iso_time(snap.policy_applied_at),
                "apps": len(policy.apps),
            },
            "enclaves": sum(app.enclaves for app in snap.apps),
            "apps": apps,
            "admitted": snap.admitted,
            "rejected": snap.rejected,
            "ended": snap.ended,
            "dropped": snap.dropped,
            "handshakes": {
                "half_open": snap.half_open,
                "half_open_sources": snap.half_open_sources,
                "started": snap.handshakes_started,
                "certificate_timeouts": snap.certificate_timeouts,
            },
            # How often each limit (gateway.yaml `limits:`) refused or evicted something.
            "limits": snap.limits,
            "revocations": self.revocations.to_json(),
        }
