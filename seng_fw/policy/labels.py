"""Label ids: one 16-bit id per (app, host class), the halves of the conntrack mark.

The mark layout is `seng_fw.label.marks`; the ids are a pure function of the policy.

LABEL IDS: one per (app, host class). The `-m seng` matches of the original SENG name an
app, a category or a client-host prefix; each becomes a set of label ids fixed by the
policy, so a compiled rule is one lookup in an interval set whose key starts with the
masked mark, e.g. ``ct mark & 0x0000ffff . ip daddr . meta l4proto . th dport @egress``
(a rule naming both ends, enclave to enclave, keys on both halves:
``ct mark & 0x0000ffff . ct mark & 0xffff0000 . ip daddr . ...``; an element's mark
fields are id ranges, the responder's shifted by 16: `as_responder`), and the
registry's per-connection work is one lookup per end. Host classes are the
pieces into which the client-host prefixes named by rules (`host_prefixes`) cut the
IPv4 space; an app gets one id per class that its `hosts` reach. Ids are numbered app
by app in policy order and class by class in address order, so:

- an app is one range of ids; a category the union of its apps' ranges;
- a host prefix is at most one range per app (classes never straddle a named prefix);
- a policy that names no host prefix has one class: the id of an app is its position
  in the policy from 1, the app ids of `seng_fw.compile.compiler.app_ids`.

Ids are a pure function of the policy, so the compiler and the labeller agree without
talking; a reload that inserts apps or prefixes renumbers the ids behind it (the
gateway relabels the registry in the same step as it applies the new ruleset;
established connections are accepted before any lookup, so they are not affected).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from seng_fw.policy.models import Policy

Interval = tuple[int, int]  # inclusive, as in seng_fw.compile.boxes

NONE: Final = 0x0000  # not an enclave: an external host, the gateway itself
UNKNOWN: Final = 0xFFFF  # a shared-subnet address no admitted enclave holds
MAX_ID: Final = 0xFFFE

_ADDRESS_SPACE: Final = 1 << 32


def merge(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, with touching or overlapping intervals joined."""
    out: list[Interval] = []
    for low, high in sorted(intervals):
        if out and low <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], high))
        else:
            out.append((low, high))
    return out


def _interval(network: IPv4Network) -> Interval:
    low = int(network.network_address)
    return low, low + network.num_addresses - 1


@dataclass(frozen=True)
class AppLabels:
    """What the table needs to know of an app (a policy `App` has these fields)."""

    name: str
    hosts: tuple[IPv4Network, ...]
    categories: tuple[str, ...] = ()


@dataclass(frozen=True)
class LabelInfo:
    """What a label id stands for (for status output and tests)."""

    id: int
    app: str
    hosts: Interval  # the host class: first and last client-host address

    def describe(self) -> str:
        low, high = (IPv4Address(a) for a in self.hosts)
        return f"{self.app}@{low}-{high}" if self.hosts != (0, _ADDRESS_SPACE - 1) else self.app


class LabelTable:
    """Label ids of a policy: `label_id(app, host)` for the labeller, `select(...)` for
    the compiler. Immutable; build a new one when the policy changes."""

    def __init__(self, apps: Sequence[AppLabels], host_prefixes: Iterable[IPv4Network] = ()):
        self.host_prefixes = tuple(sorted(set(host_prefixes)))
        bounds = {0, _ADDRESS_SPACE}
        for prefix in self.host_prefixes:
            low, high = _interval(prefix)
            bounds.update((low, high + 1))
        # Class i is [starts[i], starts[i + 1] - 1].
        self._starts = sorted(bounds)
        self.apps = tuple(apps)
        if len({app.name for app in self.apps}) != len(self.apps):
            raise ValueError("duplicate app name")
        self._ids: dict[str, dict[int, int]] = {}  # app -> class index -> id
        self._info: list[LabelInfo] = []
        for app in self.apps:
            classes = self._classes_of(app.hosts)
            per_app: dict[int, int] = {}
            for index in classes:
                label = len(self._info) + 1
                if label > MAX_ID:
                    raise ValueError(
                        f"more than {MAX_ID} label ids (apps x host classes): "
                        "name fewer client-host prefixes in rules"
                    )
                per_app[index] = label
                self._info.append(LabelInfo(label, app.name, self._class_interval(index)))
            self._ids[app.name] = per_app

    @classmethod
    def from_policy(cls, policy: Policy, host_prefixes: Iterable[IPv4Network] = ()) -> LabelTable:
        """`host_prefixes`: the client-host prefixes the policy's rules name."""
        apps = [AppLabels(a.name, tuple(a.hosts), tuple(a.categories)) for a in policy.apps]
        return cls(apps, host_prefixes)

    # --- the labeller's side ----------------------------------------------------

    def label_id(self, app: str, host: IPv4Address | int) -> int:
        """The label of an enclave of `app` on client host `host`; UNKNOWN if the
        policy gives it none (an unknown app, a host in a class the app's `hosts` do
        not reach; admission has checked the hosts already)."""
        ids = self._ids.get(app)
        if ids is None:
            return UNKNOWN
        return ids.get(bisect.bisect_right(self._starts, int(host)) - 1, UNKNOWN)

    def info(self, label: int) -> LabelInfo | None:
        if 1 <= label <= len(self._info):
            return self._info[label - 1]
        return None

    def __len__(self) -> int:
        """How many label ids are in use (the highest id)."""
        return len(self._info)

    # --- the compiler's side ----------------------------------------------------

    def select(
        self,
        *,
        apps: Iterable[str] | None = None,
        category: str | None = None,
        host: IPv4Network | None = None,
    ) -> list[Interval]:
        """Ranges of the label ids of enclaves that belong to one of `apps` (None: any
        app), to `category` if given, and run on a client host inside `host` if given.
        Each range is one set element; [] means the selection matches nothing.

        `host` must be one of `host_prefixes` (or cover whole classes), else the table
        cannot tell its hosts apart and ValueError is raised.
        """
        wanted = None if apps is None else set(apps)
        if wanted is not None and (unknown := wanted - set(self._ids)):
            raise KeyError(f"unknown app {sorted(unknown)[0]!r}")
        host_range = None if host is None else _interval(host)
        if host_range is not None and not self._splits_at(host_range):
            raise ValueError(f"host prefix {host} is not one of the table's host_prefixes")
        chosen: list[Interval] = []
        for app in self.apps:
            if wanted is not None and app.name not in wanted:
                continue
            if category is not None and category not in app.categories:
                continue
            for index, label in self._ids[app.name].items():
                low, high = self._class_interval(index)
                if host_range is None or (host_range[0] <= low and high <= host_range[1]):
                    chosen.append((label, label))
        return merge(chosen)

    def any_enclave(self) -> list[Interval]:
        """Every admitted enclave (never NONE or UNKNOWN)."""
        return [(1, len(self._info))] if self._info else []

    # --- internals ----------------------------------------------------------------

    def _class_interval(self, index: int) -> Interval:
        return self._starts[index], self._starts[index + 1] - 1

    def _classes_of(self, hosts: Iterable[IPv4Network]) -> list[int]:
        """Indexes of the classes that overlap any of `hosts`, in address order."""
        found: set[int] = set()
        for network in hosts:
            low, high = _interval(network)
            first = bisect.bisect_right(self._starts, low) - 1
            last = bisect.bisect_right(self._starts, high) - 1
            found.update(range(first, last + 1))
        return sorted(found)

    def _splits_at(self, interval: Interval) -> bool:
        low, high = interval
        starts = set(self._starts)
        return low in starts and high + 1 in starts
