"""Install the queue rules of the labeller, detecting which kind the kernel supports.

Two pieces, both matching only `ct state new` packets from or to the shared subnet (so
later packets of a connection never leave the kernel):

1. queue: send the packet to NFQUEUE `first`..`first + count - 1`, WITHOUT bypass:
   when no labeller is bound the kernel drops the packet (fail closed). With several
   numbers the kernel picks one by a hash of the two addresses and the protocol, so
   fan-out spreads address pairs (enclaves), not one pair's connections. Either the nftables
   `queue` statement (mode NFT, chains in our table) or, on kernels without
   CONFIG_NFT_QUEUE, the xtables NFQUEUE target through iptables-nft (mode XTABLES:
   a chain SENG_LABEL in iptables' `mangle` table, jumped to first from FORWARD,
   INPUT and OUTPUT).
2. a rate limit per source address, ahead of the queue: a source that opens more than
   `per_source_rate` new connections a second (after a burst of `per_source_burst`) has
   the excess dropped and counted (counter `rate_limited`), so one enclave flooding new
   connections cannot fill the queue, which the kernel shares among all enclaves, and
   starve the others' new connections (a full queue drops whatever arrives, whoever
   sent it). The limit runs in our table in both modes, at a priority below the queue's.
3. mark copy: after the labeller's verdict the packet continues with the next hook
   entry, so a base chain at a higher priority than the queue's copies the packet mark
   the labeller set to the connection: `ct mark set meta mark`.

Hooks and priorities (the compiled filter chains of `table inet seng` run at 0)::

    forward, input, output   priority mangle - 10 (-160)  rate limit per source address
    forward, input, output   priority mangle (-150)       queue (nft or iptables mangle)
    forward, input, output   priority mangle + 10 (-140)  ct mark set meta mark

forward and input run after DNAT (prerouting, -100), so connections to an exposed
service are labelled by the enclave behind it.

The labeller's rules live in their own table, `table ip seng_label`, not in
`table inet seng`, which the policy compiler replaces whole on every apply.
"""

from __future__ import annotations

import enum
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Any

TABLE = "seng_label"
XT_CHAIN = "SENG_LABEL"
XT_COMMENT = "seng-fw labeller"
HOOKS = ("forward", "input", "output")
QUEUE_PRIORITY = "mangle"  # -150; iptables' mangle table has this priority too
MARK_PRIORITY = "mangle + 10"
LIMIT_PRIORITY = "mangle - 10"
RATE_SET = "new_by_source"
RATE_COUNTER = "rate_limited"
DEFAULT_PER_SOURCE_RATE = 2000  # new connections a second per source (labeller: ~8,000/s)
DEFAULT_PER_SOURCE_BURST = 500  # well under the queue length (1,024), so bursts fit


class QueueMode(enum.Enum):
    NFT = "nft"  # the nftables queue statement (CONFIG_NFT_QUEUE)
    XTABLES = "xtables"  # the xtables NFQUEUE target via iptables-nft (nft_compat)


class InstallError(RuntimeError):
    """A command that installs or probes rules failed."""


@dataclass(frozen=True)
class QueueRules:
    shared: IPv4Network
    first: int = 0  # first queue number
    count: int = 1  # how many queue numbers (fan-out)
    per_source_rate: int = DEFAULT_PER_SOURCE_RATE  # new connections/s per source; 0: none
    per_source_burst: int = DEFAULT_PER_SOURCE_BURST

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.first <= self.first + self.count - 1 <= 0xFFFF:
            raise ValueError(f"bad queue range {self.first}+{self.count}")
        if self.per_source_rate < 0 or self.per_source_burst < 1:
            raise ValueError(f"bad rate limit {self.per_source_rate}/s {self.per_source_burst}")

    @property
    def queues(self) -> list[int]:
        return list(range(self.first, self.first + self.count))

    @property
    def last(self) -> int:
        return self.first + self.count - 1


def _nft_queue(rules: QueueRules) -> str:
    numbers = str(rules.first) if rules.count == 1 else f"{rules.first}-{rules.last}"
    return f"queue num {numbers}"  # no `bypass`: without a labeller, drop


def _matches(rules: QueueRules) -> list[str]:
    return [f"ct state new ip saddr {rules.shared}", f"ct state new ip daddr {rules.shared}"]


def nft_ruleset(rules: QueueRules, mode: QueueMode) -> str:
    """Our table for `nft -f`, in one transaction that replaces an earlier one. In mode
    NFT it queues too; in mode XTABLES it only copies marks (iptables queues)."""
    lines = [f"add table ip {TABLE}", f"delete table ip {TABLE}", f"table ip {TABLE} {{"]
    if rules.per_source_rate:
        # One dynamic set for all hooks: a source's budget is the same whichever hook
        # its connections take. Idle sources expire, so the set stays small.
        lines.append(f"\tcounter {RATE_COUNTER} {{ }}")
        lines.append(
            f"\tset {RATE_SET} {{ type ipv4_addr; size 65535;"
            " flags dynamic,timeout; timeout 60s; }"
        )
    for hook in HOOKS:
        if rules.per_source_rate:
            limit = (
                f"update @{RATE_SET} {{ ip saddr limit rate over {rules.per_source_rate}/second"
                f" burst {rules.per_source_burst} packets }} counter name {RATE_COUNTER} drop"
            )
            lines.append(f"\tchain limit_{hook} {{")
            lines.append(f"\t\ttype filter hook {hook} priority {LIMIT_PRIORITY}; policy accept;")
            lines += [f"\t\t{match} {limit}" for match in _matches(rules)]
            lines.append("\t}")
        if mode is QueueMode.NFT:
            lines.append(f"\tchain queue_{hook} {{")
            lines.append(f"\t\ttype filter hook {hook} priority {QUEUE_PRIORITY}; policy accept;")
            lines += [f"\t\t{match} {_nft_queue(rules)}" for match in _matches(rules)]
            lines.append("\t}")
        lines.append(f"\tchain mark_{hook} {{")
        lines.append(f"\t\ttype filter hook {hook} priority {MARK_PRIORITY}; policy accept;")
        lines += [f"\t\t{match} ct mark set meta mark" for match in _matches(rules)]
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def xtables_restore(rules: QueueRules) -> str:
    """Input of `iptables-nft-restore --noflush` for mode XTABLES (after `xtables_remove`)."""
    if rules.count == 1:
        target = f"NFQUEUE --queue-num {rules.first}"
    else:
        target = f"NFQUEUE --queue-balance {rules.first}:{rules.last}"
    lines = ["*mangle", f":{XT_CHAIN} - [0:0]"]
    for flag in ("-s", "-d"):
        lines.append(f"-A {XT_CHAIN} {flag} {rules.shared} -m conntrack --ctstate NEW -j {target}")
    for chain in ("FORWARD", "INPUT", "OUTPUT"):
        lines.append(f'-I {chain} 1 -m comment --comment "{XT_COMMENT}" -j {XT_CHAIN}')
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


# --- running commands -----------------------------------------------------------------


def _run(
    argv: Sequence[str], netns: str | None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    full = [*(("ip", "netns", "exec", netns) if netns else ()), *argv]
    return subprocess.run(full, input=stdin, capture_output=True, text=True, check=False)


def _check(proc: subprocess.CompletedProcess[str], what: str) -> None:
    if proc.returncode != 0:
        raise InstallError(f"{what}: {proc.stderr.strip() or f'exit {proc.returncode}'}")


def nft_queue_supported(netns: str | None = None) -> bool:
    """Does the kernel accept the nftables queue statement? (A dry run: nothing changes.)"""
    probe = (
        f"add table ip {TABLE}_probe\n"
        f"add chain ip {TABLE}_probe c {{ type filter hook forward priority 0; }}\n"
        f"add rule ip {TABLE}_probe c queue num 0\n"
    )
    proc = _run(["nft", "--check", "-f", "-"], netns, probe)
    return proc.returncode == 0


def detect_mode(netns: str | None = None) -> QueueMode:
    """NFT where the kernel has the queue statement, else XTABLES (checked at install)."""
    if nft_queue_supported(netns):
        return QueueMode.NFT
    if shutil.which("iptables-nft") is None:
        raise InstallError("the kernel has no nftables queue statement and iptables-nft is missing")
    return QueueMode.XTABLES


def xtables_remove(netns: str | None = None) -> None:
    """Remove our chain and the jumps to it (whatever is left of them)."""
    for chain in ("FORWARD", "INPUT", "OUTPUT"):
        spec = ["-m", "comment", "--comment", XT_COMMENT, "-j", XT_CHAIN]
        while _run(["iptables-nft", "-t", "mangle", "-D", chain, *spec], netns).returncode == 0:
            pass
    _run(["iptables-nft", "-t", "mangle", "-F", XT_CHAIN], netns)
    _run(["iptables-nft", "-t", "mangle", "-X", XT_CHAIN], netns)


@dataclass(frozen=True)
class Installed:
    """What `install` put in place (for `seng-fw status` and `remove`)."""

    mode: QueueMode
    rules: QueueRules
    netns: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "queue_mode": self.mode.value,
            "queues": self.rules.queues,
            "shared_subnet": str(self.rules.shared),
            "table": f"ip {TABLE}",
            "new_connections_per_source": self.rules.per_source_rate or None,
            **({"xtables_chain": f"mangle {XT_CHAIN}"} if self.mode is QueueMode.XTABLES else {}),
        }


def install(
    rules: QueueRules, *, mode: QueueMode | None = None, netns: str | None = None
) -> Installed:
    """Install (or replace) the labeller's rules; `mode` None detects it.

    The mark copy goes in before the queue, so a labelled packet never meets a missing
    copy rule; until the queue is in, the compiled ruleset drops the shared subnet's
    new connections (their ct mark is 0)."""
    mode = mode or detect_mode(netns)
    if mode is QueueMode.XTABLES:
        _check(_run(["nft", "-f", "-"], netns, nft_ruleset(rules, mode)), "nft")
        xtables_remove(netns)
        proc = _run(["iptables-nft-restore", "--noflush"], netns, xtables_restore(rules))
        if proc.returncode != 0:
            remove(Installed(mode, rules, netns))
            _check(proc, "iptables-nft-restore")
    else:
        xtables_remove(netns)  # a switch from an earlier XTABLES install
        _check(_run(["nft", "-f", "-"], netns, nft_ruleset(rules, mode)), "nft")
    return Installed(mode, rules, netns)


def rate_limited(netns: str | None = None) -> int | None:
    """Packets the per-source rate limit dropped, or None when our table is missing.
    (Read over nfnetlink, not `nft`: status must not block the gateway's loop on a
    subprocess.)"""
    from seng_fw.compile.nfnetlink import table_counters
    from seng_fw.system.netns import run_in_netns

    try:
        found = run_in_netns(netns, table_counters, "ip", TABLE)
    except OSError:  # e.g. no CAP_NET_ADMIN: status still answers, without this figure
        return None
    if found is None or RATE_COUNTER not in found:
        return None
    return found[RATE_COUNTER][0]


def remove(installed: Installed | None = None, *, netns: str | None = None) -> None:
    """Remove the labeller's rules (both kinds; absent ones are fine). Afterwards new
    connections of the shared subnet are no longer queued: the compiled ruleset
    drops them as unlabelled, or, with no ruleset, they pass."""
    where = installed.netns if installed is not None else netns
    xtables_remove(where)
    _run(["nft", "delete", "table", "ip", TABLE], where)
