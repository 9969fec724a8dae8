"""What an apply would change: two nft listings of seng-fw's table (the live one and the
policy's, both normalised by the kernel) compared object by object.

A unified diff of the whole listings (difflib) was slow and large for big policies and
showed set elements in the kernel's order; here every set, map, chain and counter is
compared on its own, set elements as sets (sorted numerically: addresses, ports and
label ids as numbers), and only the objects that differ are shown. `stat()` sums the
changes per app, like `git diff --stat`.
"""

from __future__ import annotations

import bisect
import difflib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

# indentation of an object's lines, and of its elements, in nft's listing
_OBJECT, _LINE, _ELEMENT = "\t", "\t\t", "\t\t\t"
SHARED = "(shared)"  # objects of no single app
# The digest of the compiled ruleset that the last apply loaded lives in the table as
# the name of an (unused) counter: libnftables 1.0.6 does not give back a table's
# comment in JSON, and apply lists the counters anyway to carry their values over.
# (Not shown in diffs: it changes whenever anything else does.)
DIGEST_COUNTER = "seng_fw_digest_"


@dataclass
class NftObject:
    kind: str  # set, map, chain, counter
    name: str
    lines: list[str] = field(default_factory=list)  # everything but set elements
    elements: list[str] = field(default_factory=list)

    def block(self) -> list[str]:
        """The object as listed, its elements one per line, sorted numerically."""
        out = [f"{_OBJECT}{self.kind} {self.name} {{"]
        out += [f"{_LINE}{line}" for line in self.lines]
        if self.elements:
            out.append(f"{_LINE}elements = {{")
            out += [f"{_ELEMENT}{e}" for e in sorted(self.elements, key=element_key)]
            out.append(f"{_LINE}}}")
        out.append(f"{_OBJECT}}}")
        return out


_HEADER = re.compile(r"^\t(set|map|chain|counter|flowtable|quota|limit) (\S+) \{$")


def parse_listing(listing: str) -> dict[str, NftObject]:
    """The objects of `nft list table` output, by `kind name`."""
    objects: dict[str, NftObject] = {}
    current: NftObject | None = None
    pending: list[str] | None = None  # the text of an `elements = { ... }` being read
    for raw in listing.splitlines():
        if pending is not None:
            pending.append(raw.strip())
            if raw.rstrip().endswith("}"):
                assert current is not None
                current.elements += _split_elements(" ".join(pending))
                pending = None
            continue
        header = _HEADER.match(raw)
        if header:
            current = NftObject(header[1], header[2])
            if not current.name.startswith(DIGEST_COUNTER):
                objects[f"{current.kind} {current.name}"] = current
            continue
        line = raw.strip()
        if current is None or not line:
            continue
        if raw == f"{_OBJECT}}}":
            current = None
        elif line.startswith("elements = {"):
            pending = [line.removeprefix("elements = {")]
            if line.endswith("}"):
                current.elements += _split_elements(pending[0])
                pending = None
        else:
            current.lines.append(line)
    return objects


def _split_elements(text: str) -> list[str]:
    text = text.strip().removesuffix("}").strip()
    return [part.strip() for part in text.split(",") if part.strip()]


# --- numeric order ---------------------------------------------------------------

_ADDRESS = re.compile(r"^(\d+)\.(\d+)\.(\d+)\.(\d+)$")
_NUMBER = re.compile(r"^(0x[0-9a-fA-F]+|\d+)$")


def _number(text: str) -> int | None:
    address = _ADDRESS.match(text)
    if address:
        a, b, c, d = (int(part) for part in address.groups())
        return (a << 24) | (b << 16) | (c << 8) | d
    return int(text, 0) if _NUMBER.match(text) else None


def interval(token: str) -> tuple[int, int] | None:
    """An address, prefix, range or number (`10.0.0.0/24`, `80-443`, `0x00000005`) as an
    inclusive interval; None for anything else (`tcp`, `goto out_x`)."""
    low_text, sep, rest = token.partition("/")
    if sep:
        low = _number(low_text)
        if low is None or not rest.isdigit():
            return None
        return low, low | ((1 << (32 - int(rest))) - 1)
    low_text, sep, high_text = token.partition("-")
    low = _number(low_text)
    if low is None:
        return None
    high = _number(high_text) if sep else low
    return None if high is None else (low, high)


def element_key(element: str) -> tuple[tuple[int, int, int, str], ...]:
    """Sort key of an element: each field by its numeric value where it has one."""
    out = []
    for token in re.split(r" \. | : ", element):
        span = interval(token)
        out.append((0, span[0], span[1], "") if span else (1, 0, 0, token))
    return tuple(out)


# --- the diff ------------------------------------------------------------------------


@dataclass
class Change:
    """What changed in one object: rules (chain lines) and set elements."""

    key: str
    old: NftObject | None
    new: NftObject | None
    removed_elements: list[str] = field(default_factory=list)
    added_elements: list[str] = field(default_factory=list)
    removed_lines: list[str] = field(default_factory=list)
    added_lines: list[str] = field(default_factory=list)


@dataclass
class RulesetDiff:
    old: dict[str, NftObject]
    new: dict[str, NftObject]
    old_exists: bool = True
    changes: list[Change] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def lines(self) -> Iterator[str]:
        """A unified-diff-like text: per changed object a `@@ kind name @@` hunk."""
        if not self.changes:
            return
        yield "--- live" if self.old_exists else "--- live (no seng table)"
        yield "+++ policy"
        for change in self.changes:
            if change.old is None or change.new is None:
                obj, sign = (change.new, "+") if change.old is None else (change.old, "-")
                assert obj is not None
                what = "new" if sign == "+" else "removed"
                yield f"@@ {change.key} ({what}) @@"
                yield from (f"{sign}{line}" for line in obj.block())
                continue
            yield f"@@ {change.key} @@"
            old_lines = [f"{_LINE}{line}" for line in change.old.lines]
            new_lines = [f"{_LINE}{line}" for line in change.new.lines]
            if old_lines != new_lines:
                for line in difflib.ndiff(old_lines, new_lines):
                    if line[:1] in "+- ":
                        yield f"{line[0]}{line[2:]}"
            marked = [(e, "-") for e in change.removed_elements]
            marked += [(e, "+") for e in change.added_elements]
            marked.sort(key=lambda item: element_key(item[0]))
            yield from (f"{sign}{_ELEMENT}{element}" for element, sign in marked)

    def text(self) -> str:
        return "\n".join(self.lines())

    def stat(self) -> list[tuple[str, int, int, int, int]]:
        """Per app (and SHARED): rules added, rules removed, elements added, removed."""
        old_owner, new_owner = _Owners(self.old), _Owners(self.new)
        counts: dict[str, list[int]] = {}

        def count(app: str, index: int, amount: int = 1) -> None:
            counts.setdefault(app, [0, 0, 0, 0])[index] += amount

        for change in self.changes:
            name = (change.new or change.old or NftObject("", "")).name
            kind = (change.new or change.old or NftObject("", "")).kind
            if kind == "chain":
                chain_app = _chain_app(name)
                count(chain_app, 0, _rules(change.added_lines))
                count(chain_app, 1, _rules(change.removed_lines))
            for elements, owners, index in (
                (change.added_elements, new_owner, 2),
                (change.removed_elements, old_owner, 3),
            ):
                for element in elements:
                    for app in owners.of(name, element):
                        count(app, index)
        rows = [(app, n[0], n[1], n[2], n[3]) for app, n in counts.items() if any(n)]
        return sorted(rows, key=lambda row: (row[0] == SHARED, row[0]))


def _rules(lines: Iterable[str]) -> int:
    return sum(1 for line in lines if not line.startswith(("type ", "policy ")))


def _chain_app(name: str) -> str:
    for prefix in ("out_", "in_"):
        if name.startswith(prefix):
            return name.removeprefix(prefix)
    return SHARED


def _object_changes(key: str, old: NftObject | None, new: NftObject | None) -> Change | None:
    change = Change(key, old, new)
    old_elements = set(old.elements) if old else set()
    new_elements = set(new.elements) if new else set()
    change.removed_elements = sorted(old_elements - new_elements, key=element_key)
    change.added_elements = sorted(new_elements - old_elements, key=element_key)
    old_lines, new_lines = (old.lines if old else []), (new.lines if new else [])
    if old_lines != new_lines:
        for line in difflib.ndiff(old_lines, new_lines):
            if line.startswith("- "):
                change.removed_lines.append(line[2:])
            elif line.startswith("+ "):
                change.added_lines.append(line[2:])
    same = not (change.removed_elements or change.added_elements or old_lines != new_lines)
    return None if same and old is not None and new is not None else change


def compare(old_listing: str, new_listing: str, *, old_exists: bool = True) -> RulesetDiff:
    """The differences between two listings of the table (`old_listing` empty: none)."""
    return compare_objects(parse_listing(old_listing), parse_listing(new_listing), old_exists)


def same(old: NftObject | None, new: NftObject | None) -> bool:
    """Whether two objects list the same (elements in any order)."""
    if old is None or new is None:
        return old is new
    return old.lines == new.lines and set(old.elements) == set(new.elements)


def compare_objects(
    old: dict[str, NftObject], new: dict[str, NftObject], old_exists: bool = True
) -> RulesetDiff:
    """`compare` of listings already parsed (`parse_listing`)."""
    result = RulesetDiff(old, new, old_exists)
    order = list(new) + [key for key in old if key not in new]
    for key in order:
        change = _object_changes(key, old.get(key), new.get(key))
        if change is not None:
            result.changes.append(change)
    return result


class _Owners:
    """Which app an element belongs to, from the table's own maps: the app subnets and
    label ranges of the counter maps name each app (`tx_APP`)."""

    def __init__(self, objects: dict[str, NftObject]) -> None:
        self.addresses = self._spans(objects.get("map tx_counters"))
        self.labels = self._spans(objects.get("map tx_labels"))

    @staticmethod
    def _spans(counters: NftObject | None) -> tuple[list[int], list[tuple[int, int, str]]]:
        spans = []
        for element in counters.elements if counters else []:
            key, _, value = element.partition(" : ")
            span = interval(key)
            if span is not None:
                spans.append((span[0], span[1], value.strip('"').removeprefix("tx_")))
        spans.sort()
        return [low for low, _, _ in spans], spans

    def of(self, set_name: str, element: str) -> list[str]:
        if set_name.endswith(("_apps", "_labels")) and " : " in element:
            value = element.partition(" : ")[2].strip('"')
            for prefix in ("goto out_", "goto in_", "tx_", "rx_"):
                if value.startswith(prefix):
                    return [value.removeprefix(prefix)]
        if not set_name.startswith(("allowed_", "to_gateway_")):
            return [SHARED]
        by_label = "_shared_" in set_name or set_name.endswith("_labels")
        lows, spans = self.labels if by_label else self.addresses
        span = interval(re.split(r" \. | : ", element)[0])
        if span is None:
            return [SHARED]
        start = max(bisect.bisect_right(lows, span[0]) - 1, 0)
        apps = []
        for low, high, app in spans[start:]:
            if low > span[1]:
                break
            if high >= span[0]:
                apps.append(app)
        return apps or [SHARED]
