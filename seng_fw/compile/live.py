"""The live ruleset: apply a compiled table atomically, show what an apply would change,
read the per-app counters and the digests stamped on the live table.

Everything goes through libnftables (the `nftables` Python binding, package
`pip-nftables`, which needs Debian's libnftables1). Only seng-fw's own table is
ever written: the transaction is `add table` + `delete table` + the new table, one
batch that the kernel commits whole or not at all, so an administrator's tables
and a failed apply's previous ruleset are left exactly as they were.

State that lives in the table survives an apply: the per-app counters keep their
values and the gateway's entries in `expose_addr` (which enclave serves an exposed
service) are carried over while the exposure still exists.

Every applied table carries two digests, as the names of counters (libnftables 1.0.6
drops table comments given in JSON; diffs do not show them): the ruleset's
(`seng_fw_digest_<hex>`: apply skips a ruleset the table already holds) and the
policy's (`seng_fw_digest_policy_<hex>`, `seng_fw.policy.digest`), which `seng-fw
status` compares with the policy the gateway admits by. Telling the gateway to reload
is not done here: `seng-fw apply` hands it the policy over its control socket.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any, TypeVar

from seng_fw.compile import nfnetlink
from seng_fw.compile.compiler import PROTOCOLS, TABLE
from seng_fw.compile.diff import (
    DIGEST_COUNTER,
    RulesetDiff,
    compare,
    compare_objects,
    parse_listing,
    same,
)
from seng_fw.compile.listing import listed, subset
from seng_fw.compile.nft import FAMILY, Batch, Counter, Json, Table
from seng_fw.policy.digest import policy_digest
from seng_fw.policy.models import Policy

T = TypeVar("T")
# The policy's digest (not the ruleset's): what the gateway compares with its own.
POLICY_DIGEST_COUNTER = DIGEST_COUNTER + "policy_"
_PROTOCOL_NUMBERS = {name: low for name, (low, _) in PROTOCOLS.items() if name != "any"}


class NftError(RuntimeError):
    """libnftables refused a command (the message is its error output)."""


class Nft:
    """A libnftables context (in the network namespace of the thread that creates it)."""

    def __init__(self) -> None:
        try:
            import nftables

            self._nft = nftables.Nftables()
        except (ImportError, OSError) as exc:  # pragma: no cover - depends on the host
            raise NftError(
                f"cannot use libnftables ({exc}): pip install pip-nftables; it needs "
                "Debian's libnftables1"
            ) from exc
        self._nft.set_handle_output(False)

    def _run(self, command: str, *, json_out: bool, dry_run: bool = False) -> str:
        self._nft.set_json_output(json_out)
        _set_dry_run(self._nft, dry_run)
        try:
            rc, output, error = self._nft.cmd(command)
        finally:
            _set_dry_run(self._nft, False)
        if rc != 0:
            raise NftError(str(error).strip() or f"libnftables returned {rc}")
        return str(output)

    def run_json(self, document: Json, *, dry_run: bool = False) -> None:
        """Run a JSON batch (one transaction). With `dry_run` the kernel checks it and
        nothing changes."""
        self.run_document(json.dumps(document), dry_run=dry_run)

    def run_document(self, document: str, *, dry_run: bool = False) -> None:
        """Run a batch already written out (`nft.Batch.document`): nft syntax, or JSON
        if it starts with `{`. An error in nft syntax is given without the commands
        nft quotes with it (one of them may hold thousands of set elements)."""
        if document.startswith("{"):
            self._run(document, json_out=True, dry_run=dry_run)
            return
        try:
            self._run(document, json_out=False, dry_run=dry_run)
        except NftError as exc:
            errors = [line for line in str(exc).splitlines() if "Error: " in line]
            shown = [line[line.index("Error: ") :] for line in errors]
            raise NftError("\n".join(shown) or str(exc)) from None

    def list_json(self, what: str) -> list[Json]:
        output = self._run(f"list {what}", json_out=True)
        objects: list[Json] = json.loads(output)["nftables"] if output.strip() else []
        return objects

    def list_text(self, what: str, *, stateless: bool = True) -> str:
        self._nft.set_stateless_output(stateless)
        try:
            return self._run(f"list {what}", json_out=False)
        finally:
            self._nft.set_stateless_output(False)


@functools.cache
def _libnftables() -> ctypes.CDLL:
    lib = ctypes.CDLL("libnftables.so.1")
    lib.nft_ctx_set_dry_run.argtypes = [ctypes.c_void_p, ctypes.c_bool]
    return lib


def _set_dry_run(nft: Any, enabled: bool) -> None:
    # The binding has no wrapper for nft_ctx_set_dry_run; call libnftables directly
    # on the binding's context.
    _libnftables().nft_ctx_set_dry_run(nft._Nftables__ctx, enabled)


# --- live state carried over an apply ------------------------------------------------


def ruleset_digest(table: Table | Batch, source: str = "") -> str:
    """sha256 of the compiled table, before any live state (counter values, exposure
    targets) is carried over, and of `source` (the policy's own digest: admission
    settings such as MRENCLAVE change no rule, yet the gateway must reload them).
    Pass the table's Batch when there is one: rendering is what costs."""
    batch = table if isinstance(table, Batch) else Batch(table)
    return hashlib.sha256(batch.document().encode() + b"\0" + source.encode()).hexdigest()


@dataclass
class LiveState:
    exists: bool = False
    digest: str | None = None  # of the ruleset the last apply loaded
    policy_digest: str | None = None  # of the policy it was compiled from
    counters: dict[str, tuple[int, int]] = field(default_factory=dict)
    # (gateway address, protocol number, port) -> serving enclave address
    exposed: dict[tuple[int, int, int], IPv4Address] = field(default_factory=dict)


def read_state(nft: Nft, table: str) -> LiveState:
    """Counters and exposure targets of the live table (the counters straight from the
    kernel, `nfnetlink`: libnftables would fetch every set element first; the exposure
    map alone through libnftables, which then fetches only that map)."""
    try:
        live_counters = nfnetlink.table_counters(FAMILY, table)
    except OSError as exc:
        raise NftError(f"cannot read table {FAMILY} {table}: {exc}") from exc
    if live_counters is None:
        return LiveState()
    state = LiveState(exists=True)
    for name, values in live_counters.items():
        if name.startswith(POLICY_DIGEST_COUNTER):
            state.policy_digest = name.removeprefix(POLICY_DIGEST_COUNTER)
        elif name.startswith(DIGEST_COUNTER):
            state.digest = name.removeprefix(DIGEST_COUNTER)
        else:
            state.counters[name] = values
    try:
        exposed = nft.list_json(f"map {FAMILY} {table} expose_addr")
    except NftError:
        exposed = []  # a table written by an older seng-fw
    for obj in exposed:
        for key, value in obj.get("map", {}).get("elem", []):
            address, proto, port = key["concat"]
            number = _PROTOCOL_NUMBERS[proto] if isinstance(proto, str) else int(proto)
            state.exposed[(int(IPv4Address(address)), number, int(port))] = IPv4Address(value)
    return state


def carry_over(table: Table, policy: Policy, state: LiveState) -> None:
    """Keep counter values and the gateway's exposure targets that are still valid."""
    for counter in table.counters:
        counter.packets, counter.bytes = state.counters.get(counter.name, (0, 0))
    owners = {
        (int(e.address), _PROTOCOL_NUMBERS[e.protocol], e.port): policy.subnet_of(app).subnet
        for app in policy.apps
        for e in app.expose
    }
    exposed = table.set("expose_addr")
    exposed.elements, exposed.values = [], []  # (carried over once, however often called)
    for (address, proto, port), target in sorted(state.exposed.items()):
        subnet = owners.get((address, proto, port))
        if subnet is not None and target in subnet:
            exposed.add(((address, address), (proto, proto), (port, port)), int(target))


# --- apply, diff --------------------------------------------------------------------


def _stamps(digest: str, policy: str) -> list[Counter]:
    return [Counter(DIGEST_COUNTER + digest), Counter(POLICY_DIGEST_COUNTER + policy)]


@dataclass(frozen=True)
class ApplyResult:
    changed: bool  # False: the live table already holds this ruleset; nothing was done
    replaced: bool  # there was a seng table before
    digest: str
    policy_digest: str  # `seng_fw.policy.digest` of the policy applied


Step = Callable[[str], contextlib.AbstractContextManager[None]]


@contextlib.contextmanager
def _quiet(_: str) -> Iterator[None]:
    yield


def apply(
    table: Table,
    policy: Policy,
    nft: Nft | None = None,
    *,
    dry_run: bool = False,
    force: bool = False,
    step: Step = _quiet,
) -> ApplyResult:
    """Replace seng-fw's table with `table` in one transaction (raises NftError and
    changes nothing if the kernel refuses any part of it). When the live table already
    holds this very ruleset (same digest) nothing is done, unless `force`. `step(name)`
    wraps each phase (for progress output). The digest covers the policy's own digest
    too (see `ruleset_digest`), computed from the very policy that was compiled."""
    nft = nft or Nft()
    with step("render"):
        batch = Batch(table)  # once: the digest and the transaction are made from it
        admission = policy_digest(policy)
        digest = ruleset_digest(batch, admission)
    with step("read the live table"):
        state = read_state(nft, table.name)
    if state.digest == digest and not force:
        return ApplyResult(False, state.exists, digest, admission)
    carry_over(table, policy, state)
    with step("render"):
        # with what carry_over changed: counter values, the exposure targets
        document = batch.document(table, ["expose_addr"], _stamps(digest, admission))
    with step("kernel transaction"):
        nft.run_document(document, dry_run=dry_run)
    return ApplyResult(True, state.exists, digest, admission)


def live_digest(nft: Nft, table: str = TABLE) -> str | None:
    """The policy digest stamped on the live table; None without table or stamp (a
    table loaded by hand, or by an older seng-fw)."""
    return read_state(nft, table).policy_digest


def in_scratch_namespace(fn: Callable[[], T]) -> T:
    """Run `fn` in a thread that has its own, new and empty, network namespace."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET
                err = ctypes.get_errno()
                raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name="seng-fw-scratch-netns")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def diff(table: Table, policy: Policy, nft: Nft | None = None) -> RulesetDiff:
    """What `apply` would change in seng-fw's table, object by object, both sides as
    the kernel lists them: the live table's listing, and the policy's table written as
    nft lists it (`listing`), where an object that does not list as the live one does
    is loaded into a scratch namespace and listed by the kernel (with the references
    it needs), so that only the kernel's own listing is compared and shown. (It used
    to load the whole table there: with 10,000 apps a second kernel load and listing.)
    The digest stamps are left out: diffs do not show them."""
    nft = nft or Nft()
    state = read_state(nft, table.name)
    carry_over(table, policy, state)
    old = parse_listing(nft.list_text(f"table inet {table.name}")) if state.exists else {}
    new = listed(table)
    suspects = [key for key, obj in new.items() if not same(old.get(key), obj)]
    if suspects:
        document = Batch(subset(table, suspects)).document()

        def load_and_list() -> str:
            scratch = Nft()
            scratch.run_document(document)
            return scratch.list_text(f"table inet {table.name}")

        normalised = parse_listing(in_scratch_namespace(load_and_list))
        for key in suspects:
            new[key] = normalised[key]
    return compare_objects(old, new, state.exists)


def diff_by_loading(table: Table, policy: Policy, nft: Nft | None = None) -> RulesetDiff:
    """`diff` the way it was done before `listing`: the whole table loaded into a
    scratch namespace and listed (the reference `diff` is tested against)."""
    nft = nft or Nft()
    state = read_state(nft, table.name)
    carry_over(table, policy, state)
    old = nft.list_text(f"table inet {table.name}") if state.exists else ""
    document = Batch(table).document()

    def load_and_list() -> str:
        scratch = Nft()
        scratch.run_document(document)
        return scratch.list_text(f"table inet {table.name}")

    return compare(old, in_scratch_namespace(load_and_list), old_exists=state.exists)


def counters(nft: Nft, table: str) -> dict[str, tuple[int, int]]:
    """Per-app (packets, bytes) counters: names `tx_APP` / `rx_APP` (for `status`)."""
    return read_state(nft, table).counters


def set_exposure_target(
    nft: Nft, policy: Policy, app_name: str, enclave: IPv4Address | None, table: str = TABLE
) -> None:
    """Make `enclave` serve every exposure of app `app_name` (the gateway calls this when
    an enclave of the app gets its address), or with `enclave` None withdraw them (when
    it goes). One batch: existing entries of those exposures are replaced."""
    current = read_state(nft, table).exposed
    body = {"family": FAMILY, "table": table, "name": "expose_addr"}
    commands: list[Json] = []
    for exposure in policy.app(app_name).expose:
        key = {"concat": [str(exposure.address), exposure.protocol, exposure.port]}
        number = _PROTOCOL_NUMBERS[exposure.protocol]
        if (int(exposure.address), number, exposure.port) in current:
            commands.append({"delete": {"element": {**body, "elem": [key]}}})
        if enclave is not None:
            commands.append({"add": {"element": {**body, "elem": [[key, str(enclave)]]}}})
    if commands:
        nft.run_json({"nftables": commands})
