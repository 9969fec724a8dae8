"""The one owner of a running gateway's policy, revocations and status.

`GatewayService` answers what the control socket, SIGHUP and `seng-fw apply` ask of a
running `GatewayCore`: status, the enclave list, revocations and policy reloads; it runs
on the event loop and leaves the I/O to the adapter through its callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from ipaddress import IPv4Address
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seng_fw.gateway.config import GatewayConfig
from seng_fw.gateway.counters import Traffic, by_reason
from seng_fw.gateway.revocations import (
    RevocableAdmission,
    Revocation,
    RevocationStore,
    RevocationStoreError,
    identity_fingerprint,
    revocations_from,
)
from seng_fw.policy.admission import AdmissionCheck
from seng_fw.policy.digest import policy_digest
from seng_fw.policy.models import Policy

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
    policy_digest: str  # of the policy the gateway admits by
    ruleset_digest: str | None  # of the policy the live ruleset was compiled from
    policy_applied_at: float  # wall clock
    half_open: int = 0  # handshakes past the cookie check, not completed
    half_open_sources: int = 0  # source addresses they come from
    handshakes_started: int = 0
    certificate_timeouts: int = 0  # half-open handshakes dropped without a certificate
    limits: dict[str, int] = field(default_factory=dict)  # hits by Limit


def _nothing() -> None:
    return None


def _no_queue() -> str:
    return "none"


def iso_time(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class FirewallState:
    """What the live ruleset says, read with libnftables in a worker thread."""

    counters: dict[str, tuple[int, int]] = field(default_factory=dict)  # tx_APP / rx_APP
    # The digest of the policy the live table was compiled from (None: not stamped).
    policy_digest: str | None = None
    read: bool = False  # False: not read (no nft access configured, or it failed)


class GatewayService:
    """The one owner of a running gateway's policy, revocations and status: the control
    socket (`ControlHandler`), SIGHUP and `seng-fw apply` all go through it. All methods
    run on the event loop; blocking work goes to worker threads.

    `load_policy(path)` reads a policy (raises if it is invalid); `before_reload` gets
    the adapter ready for a new policy before it takes effect. `after_change` runs
    after tunnels were closed or subnets changed, so that the adapter sends the queued
    close_notify alerts, starts conntrack flushes and syncs the TUN addresses.
    `read_firewall` reads the live ruleset's counters and policy digest (blocking).
    """

    def __init__(
        self,
        core: GatewayCore,
        config: GatewayConfig,
        *,
        load_policy: Callable[[Path], Policy],
        before_reload: Callable[[Policy], Awaitable[None]] | None = None,
        after_change: Callable[[], None] = _nothing,
        queue_mode: Callable[[], str] = _no_queue,
        read_firewall: Callable[[], FirewallState] | None = None,
        labeller_counters: Callable[[], Mapping[str, int]] | None = None,
        store: RevocationStore | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.core = core
        self.config = config
        self.load_policy = load_policy
        self.before_reload = before_reload
        self.after_change = after_change
        self.queue_mode = queue_mode
        self.read_firewall = read_firewall
        self.labeller_counters = labeller_counters
        self._clock = clock
        self._wall = wall_clock
        self._save_lock = asyncio.Lock()
        # Raises RevocationStoreError if the stored ones cannot be read: the gateway
        # must not start and let revoked enclaves back in.
        self.store = store
        self.revocations = revocations_from(store)
        self.started = clock()
        self.started_at = wall_clock()
        self.policy_applied_at = self.started_at
        # Where the running policy came from: the configuration's, until `apply` hands
        # over another one (then SIGHUP reloads that one too).
        self.policy_path: Path = config.policy
        self._digest: tuple[Policy, str] | None = None
        self._firewall = FirewallState()
        self._reload_lock = asyncio.Lock()
        core.admission = self._admission()

    # --- policy ----------------------------------------------------------------------

    def _admission(self) -> RevocableAdmission:
        """The core's admission with our revocations (wrapped again if it was replaced)."""
        admission = self.core.admission
        if isinstance(admission, RevocableAdmission) and admission.revocations is self.revocations:
            return admission
        return RevocableAdmission(admission.policy, self.revocations)

    async def load_and_apply_policy(
        self, path: Path | None = None, expected_digest: str | None = None
    ) -> int:
        """Load the policy at `path` (default: the running policy's file) and apply it;
        raises if it is invalid, or its digest is not `expected_digest`, and keeps the
        running one. Enclaves it no longer admits are closed; returns how many. The
        files are read and checked (and the digest taken) in a worker thread: a
        10,000-app policy takes seconds to load, and on the event loop that stalled
        every tunnel (and the watchdog) for as long. Reloads run one at a time."""
        async with self._reload_lock:
            path = path or self.policy_path
            policy, digest = await asyncio.to_thread(self._load_with_digest, path)
            if expected_digest is not None and digest != expected_digest:
                # The file changed between `apply` compiling it and us reading it: what
                # we would admit by is not what the ruleset enforces. Fail closed.
                raise ControlError(
                    f"{path} now has digest {digest[:16]}, not {expected_digest[:16]} "
                    "as applied: it changed meanwhile; apply it again"
                )
            if self.before_reload is not None:
                await self.before_reload(policy)
            before = len(self.core.enclaves)
            self.core.reload(RevocableAdmission(policy, self.revocations), self._clock())
            self._digest = (policy, digest)
            self.policy_path = path
            self.policy_applied_at = self._wall()
            return before - len(self.core.enclaves)

    def _load_with_digest(self, path: Path) -> tuple[Policy, str]:
        policy = self.load_policy(path)
        return policy, policy_digest(policy)

    def policy_digest(self) -> str:
        policy = self.core.admission.policy
        if self._digest is None or self._digest[0] is not policy:
            self._digest = (policy, policy_digest(policy))
        return self._digest[1]

    async def refresh_firewall(self) -> FirewallState:
        """Read the live ruleset's counters and digest (in a worker thread); kept for
        `snapshot()`. A failure is logged and leaves an unread state: status and
        metrics must not fail because nft did."""
        if self.read_firewall is None:
            return self._firewall
        try:
            self._firewall = await asyncio.to_thread(self.read_firewall)
        except Exception as exc:
            log.warning("cannot read the live ruleset: %s", exc)
            self._firewall = FirewallState()
        return self._firewall

    async def reload_on_signal(self) -> None:
        """SIGHUP: like `seng-fw reload`; a refusal is logged, the running policy kept."""
        with contextlib.suppress(ControlError):
            await self.reload()

    # --- ControlHandler --------------------------------------------------------------

    async def reload(self, policy: str | None = None, digest: str | None = None) -> dict[str, Any]:
        """`seng-fw reload`, `systemctl reload` and SIGHUP (the running policy's file
        again), and `seng-fw apply` (`policy`: the file it applied, `digest`: of what it
        compiled; the gateway loads that very policy or refuses)."""
        path = None
        if policy is not None:
            path = Path(policy)
            if not path.is_absolute():
                raise ControlError(f"reload: the policy path must be absolute, got {policy!r}")
        if digest is not None and not _is_digest(digest):
            raise ControlError(f"reload: a digest is 64 hex digits, got {digest!r}")
        try:
            closed = await self.load_and_apply_policy(path, digest)
        except ControlError as exc:
            log.error(
                "policy reload refused, keeping the running policy: %s", exc,
                extra={"event": "reload_refused"},
            )  # fmt: skip
            raise ControlError(f"policy not reloaded, the running one is kept: {exc}") from exc
        except Exception as exc:
            detail = str(exc).replace("\n", "; ")
            log.error(
                "policy reload failed, keeping the running policy: %s", detail,
                extra={"event": "reload_refused"},
            )  # fmt: skip
            raise ControlError(f"policy not reloaded, the running one is kept:\n{exc}") from exc
        self.after_change()
        after = len(self.core.enclaves)
        log.info("policy reloaded: %d enclaves remain, %d closed", after, closed)
        return {
            "policy": str(self.policy_path),
            "digest": self.policy_digest(),
            "apps": len(self.core.admission.policy.apps),
            "enclaves": after,
            "closed": closed,
        }

    async def revoke(
        self,
        *,
        app: str | None = None,
        address: str | None = None,
        mrenclave: str | None = None,
        clear: bool = False,
        reason: str = "",
        by: str = "?",
    ) -> dict[str, Any]:
        """Revoke (or with `clear` lift every revocation); in force at once, then saved
        in the store (in a worker thread). If saving fails the revocation still holds
        until the gateway stops, and the answer says so."""
        given = [value for value in (app, address, mrenclave) if value is not None]
        if len(given) + clear != 1:
            raise ControlError("revoke: give exactly one of app, address, mrenclave or clear")
        if clear:
            count = self.revocations.clear()
            log.warning(
                "revocations cleared (%d) by %s", count, by,
                extra={"event": "revocations_cleared", "by": by},
            )  # fmt: skip
            return {"cleared": count, "ended": [], **await self._save()}
        revocation = self._revocation(app, address, mrenclave, reason, by)
        self.revocations.add(revocation)
        what = revocation.describe()
        before = self.core.enclaves
        # The core closes the tunnels of every enclave that its admission now refuses.
        self.core.reload(self._admission(), self._clock(), cause="revocation")
        remaining = set(self.core.enclaves)
        ended = [enclave for enclave in before if enclave not in remaining]
        self.after_change()
        log.warning(
            "revocation: revoked %s by %s%s: %d enclaves closed",
            what, by, f" ({reason})" if reason else "", len(ended),
            extra={"event": "revocation", "revoked": what, "by": by, "closed": len(ended)},
        )  # fmt: skip
        now, wall = self._clock(), self._wall()
        ended_records = [self._record(e, now, wall) for e in ended]
        return {"revoked": what, "ended": ended_records, **await self._save()}

    def revocation_list(self) -> list[dict[str, Any]]:
        """`seng-fw revoke --list`: every revocation with who, when and why."""
        return self.revocations.to_json()

    async def _save(self) -> dict[str, Any]:
        if self.store is None:
            return {"saved": False}
        # One save at a time, each taking its snapshot inside the lock: two revokes at
        # once could otherwise land the older list last and lose a revocation on restart.
        try:
            async with self._save_lock:
                await asyncio.to_thread(self.store.save, list(self.revocations.items))
        except RevocationStoreError as exc:
            log.error("revocations not saved (in force until the gateway stops): %s", exc)
            return {"saved": False, "warning": f"not saved, in force until a restart: {exc}"}
        return {"saved": True}

    def _revocation(
        self, app: str | None, address: str | None, mrenclave: str | None, reason: str, by: str
    ) -> Revocation:
        at = iso_time(self._wall())
        if app is not None:
            if app not in {known.name for known in self.core.admission.policy.apps}:
                raise ControlError(f"no app {app!r} in the running policy")
            return Revocation("app", app, by, at, reason)
        if mrenclave is not None:
            text = mrenclave.strip().lower().removeprefix("0x")
            try:
                value = bytes.fromhex(text)
            except ValueError:
                value = b""
            if len(value) != 32:
                raise ControlError(f"MRENCLAVE must be 64 hex digits, got {mrenclave!r}")
            return Revocation("mrenclave", value.hex(), by, at, reason)
        try:
            wanted = IPv4Address(address or "")
        except ValueError:
            raise ControlError(f"{address!r} is not an IPv4 address") from None
        for enclave in self.core.enclaves:
            if enclave.address == wanted:
                return Revocation(
                    "enclave", str(wanted), by, at, reason, app=enclave.app.name,
                    host=str(enclave.host), fingerprint=identity_fingerprint(enclave.identity),
                )  # fmt: skip
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
            firewall=dict(self._firewall.counters),
            policy_digest=self.policy_digest(),
            ruleset_digest=self._firewall.policy_digest,
            policy_applied_at=self.policy_applied_at,
            half_open=len(core.handshakes),
            half_open_sources=core.handshakes.sources(),
            handshakes_started=counters.handshakes_started,
            certificate_timeouts=counters.certificate_timeouts,
            limits=by_reason(counters.limits),
        )

    async def status(self) -> dict[str, Any]:
        firewall = await self.refresh_firewall()
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
                "file": str(self.policy_path),
                "digest": snap.policy_digest,
                "applied_at": iso_time(snap.policy_applied_at),
                "apps": len(policy.apps),
                # The digest stamped on the live ruleset by `seng-fw apply` (None: not
                # read, or not stamped).
                "ruleset_digest": snap.ruleset_digest,
            },
            "warnings": _warnings(firewall, snap.policy_digest),
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


def _is_digest(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _warnings(firewall: FirewallState, admission_digest: str) -> list[str]:
    """What an operator must know about the live ruleset against the admission policy."""
    if not firewall.read:
        return []
    if firewall.policy_digest is None:
        return [
            "the live ruleset carries no policy digest (no table inet seng, or not loaded "
            "by seng-fw apply): cannot tell whether it enforces the policy the gateway "
            "admits by"
        ]
    if firewall.policy_digest != admission_digest:
        return [
            f"the live ruleset was compiled from another policy (digest "
            f"{firewall.policy_digest[:16]}) than the gateway admits by "
            f"({admission_digest[:16]}): apply the gateway's policy, or reload it"
        ]
    return []
