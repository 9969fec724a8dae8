"""A compiled table as `nft -s list table` shows it once loaded, without loading it.

`diff` compares the live table's listing with the policy's table object by object.
It used to load the policy's table into a scratch network namespace and list it: with
10,000 apps that was a second full kernel load and listing (tens of seconds and more
than a gigabyte). The listing of a table seng-fw compiled is a plain function of its
objects, in the few forms the compiler writes; this module writes it, in the order
the kernel lists a table loaded by `live.apply` (counters, sets and maps, chains, each
in the order of the batch). tests/integration/test_nft_apply.py checks it against the
kernel's listing of the same tables.

nft has listing quirks no one should copy (1.0.6 shows some elements of concatenated
interval sets with mark fields byte-swapped, the same way each time). So `diff` takes
only the objects whose written listing equals the live one's as unchanged; every other
object (changed, new, or listed differently) is loaded into a scratch namespace, with
empty declarations of what it refers to (`subset`), and the kernel's listing of it is
what is compared and shown. What is shown is therefore always the kernel's listing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

from seng_fw.compile.diff import DIGEST_COUNTER, NftObject
from seng_fw.compile.nft import (
    Chain,
    CounterMap,
    Ct,
    DnatMaps,
    Expr,
    Match,
    NamedSet,
    Rule,
    Table,
    Verdict,
    Vmap,
)


def listed(table: Table) -> dict[str, NftObject]:
    """The objects of the table's listing, by `kind name` (as `diff.parse_listing`)."""
    objects: dict[str, NftObject] = {}
    for counter in table.counters:
        if not counter.name.startswith(DIGEST_COUNTER):
            objects[f"counter {counter.name}"] = NftObject("counter", counter.name)
    rule_sets = [named for named in table.sets if named.group]
    shared = [named for named in table.sets if not named.group]
    for named in rule_sets + shared:  # the batch's order (`Table.objects`)
        obj = _set(named)
        objects[f"{obj.kind} {obj.name}"] = obj
    for chain in table.chains:
        objects[f"chain {chain.name}"] = _chain(chain)
    return objects


def _set(named: NamedSet) -> NftObject:
    kind = "map" if named.is_map else "set"
    type_text = " . ".join(named.key) + (f" : {named.data}" if named.data else "")
    obj = NftObject(kind, named.name, [f"type {type_text}"])
    if named.interval:
        obj.lines.append("flags interval")
    obj.elements = named.element_texts(listing=True)
    return obj


def _chain(chain: Chain) -> NftObject:
    obj = NftObject("chain", chain.name)
    if chain.hook:
        h = chain.hook
        obj.lines.append(
            f"type {h.type} hook {h.hook} priority {h.priority_name}; policy {h.policy};"
        )
    obj.lines += [_rule(rule) for rule in chain.rules]
    return obj


def _rule(rule: Rule) -> str:
    return " ".join(_expr(expr) for expr in rule.exprs)


def _expr(expr: Expr) -> str:
    mark = isinstance(expr, Match) and isinstance(expr.left, Ct) and expr.left.key == "mark"
    if mark and isinstance(expr, Match) and isinstance(expr.right, int):  # listed in hex
        sign = "!= " if expr.op == "!=" else ""
        return f"{expr.left.text()} {sign}0x{expr.right:08x}"
    if isinstance(expr, DnatMaps):
        k = expr.lookup.text()
        return f"dnat ip to {k} map @{expr.addresses}:{k} map @{expr.ports}"
    return expr.text()


def subset(table: Table, keys: Iterable[str]) -> Table:
    """The objects `keys` (`kind name`) of `table`, whole, and empty declarations of
    the sets, maps, chains and counters they refer to: a table the kernel loads, whose
    listing has those objects as the whole table's would."""
    wanted = set(keys)
    sets = {named.name: named for named in table.sets}
    chains = {chain.name: chain for chain in table.chains}
    need_sets: set[str] = set()
    need_chains: set[str] = set()
    need_counters: set[str] = set()
    for key in wanted:
        kind, _, name = key.partition(" ")
        if kind == "chain" and name in chains:
            for rule in chains[name].rules:
                for expr in rule.exprs:
                    need_sets.update(_sets_of(expr))
                    if isinstance(expr, Verdict) and expr.target:
                        need_chains.add(expr.target)
        elif kind in ("set", "map") and name in sets:
            named = sets[name]
            if named.data == "verdict":
                need_chains.update(str(v).partition(" ")[2] for v in named.values)
            elif named.data == "counter":
                need_counters.update(str(v) for v in named.values)
        elif kind == "counter":
            need_counters.add(name)
    out = Table(table.name)
    out.counters = [c for c in table.counters if c.name in need_counters]
    for named in table.sets:
        if f"{'map' if named.is_map else 'set'} {named.name}" in wanted:
            out.sets.append(named)
        elif named.name in need_sets:
            out.sets.append(dataclasses.replace(named, elements=[], values=[]))
    for chain in table.chains:
        if f"chain {chain.name}" in wanted:
            out.chains.append(chain)
        elif chain.name in need_chains:
            out.chains.append(Chain(chain.name, group=chain.group))
    return out


def _sets_of(expr: Expr) -> Iterator[str]:
    if isinstance(expr, Match) and isinstance(expr.right, str) and expr.right.startswith("@"):
        yield expr.right[1:]
    elif isinstance(expr, Vmap | CounterMap):
        yield expr.map
    elif isinstance(expr, DnatMaps):
        yield from (expr.addresses, expr.ports)
