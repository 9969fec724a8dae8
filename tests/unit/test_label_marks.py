"""Mark layout and label ids: what the compiled rules select is what the labeller sets."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seng_fw.compile.compiler import app_ids
from seng_fw.label.marks import (
    MAX_ID,
    NONE,
    UNKNOWN,
    AppLabels,
    LabelTable,
    as_responder,
    decode,
    encode,
    is_labelled,
    merge,
)
from seng_fw.policy.models import Policy

N = IPv4Network
A = IPv4Address


def policy(*apps: tuple[str, list[str], list[str]]) -> Policy:
    categories = {c for _, _, cats in apps for c in cats}
    return Policy.model_validate(
        {
            "categories": {c: {} for c in sorted(categories)},
            "apps": [
                {"name": name, "mrenclave": f"{i:064x}", "hosts": hosts, "categories": cats}
                for i, (name, hosts, cats) in enumerate(apps, start=1)
            ],
        }
    )


THREE = policy(
    ("web", ["10.1.0.0/24"], ["frontend"]),
    ("api", ["10.1.0.2/32"], ["frontend", "backend"]),
    ("db", ["10.1.0.3/32"], ["backend"]),
)
HOST_A, HOST_B = N("10.1.0.2/32"), N("10.1.0.3/32")


@given(st.integers(0, UNKNOWN), st.integers(0, UNKNOWN))
def test_encode_decode_roundtrip(originator: int, responder: int) -> None:
    mark = encode(originator, responder)
    assert 0 <= mark < 1 << 32
    assert decode(mark) == (originator, responder)
    assert mark & 0xFFFF == originator and mark >> 16 == responder


def test_layout_and_reserved_labels() -> None:
    assert encode(3, 0) == 0x00000003
    assert encode(0, 3) == 0x00030000
    assert encode(UNKNOWN, NONE) == 0x0000FFFF
    assert not is_labelled(0) and is_labelled(encode(UNKNOWN, NONE))
    assert as_responder((2, 5)) == (0x20000, 0x50000)
    with pytest.raises(ValueError):
        encode(1 << 16, 0)


def test_merge() -> None:
    assert merge([(5, 6), (1, 2), (3, 3), (9, 9)]) == [(1, 3), (5, 6), (9, 9)]
    assert merge([]) == []


def test_without_host_prefixes_ids_are_the_compilers_app_ids() -> None:
    table = LabelTable.from_policy(THREE)
    ids = app_ids(THREE)
    assert {app.name: table.label_id(app.name, A("10.1.0.2")) for app in THREE.apps} == ids
    assert table.select(apps=["api"]) == [(ids["api"], ids["api"])]
    assert table.select(category="backend") == [(2, 3)]
    assert table.select(category="frontend") == [(1, 2)]
    assert table.any_enclave() == [(1, 3)]
    assert len(table) == 3


def test_unknown_app_gets_unknown_label() -> None:
    table = LabelTable.from_policy(THREE)
    assert table.label_id("nope", A("10.1.0.2")) == UNKNOWN
    with pytest.raises(KeyError):
        table.select(apps=["nope"])


def test_host_prefixes_split_apps_into_host_classes() -> None:
    table = LabelTable.from_policy(THREE, [HOST_A, HOST_B])
    web_a, web_b = table.label_id("web", A("10.1.0.2")), table.label_id("web", A("10.1.0.3"))
    web_other = table.label_id("web", A("10.1.0.9"))
    api, db = table.label_id("api", A("10.1.0.2")), table.label_id("db", A("10.1.0.3"))
    assert len({web_a, web_b, web_other, api, db}) == 5
    assert UNKNOWN not in {web_a, web_b, web_other, api, db}
    # web has 10.1.0.0/24: classes below, at, between and above the two hosts (4 ids).
    assert table.select(apps=["web"]) == [(1, 4)]
    assert table.select(host=HOST_A) == merge([(web_a, web_a), (api, api)])
    assert table.select(host=HOST_B) == merge([(web_b, web_b), (db, db)])
    assert table.select(apps=["web"], host=HOST_B) == [(web_b, web_b)]
    assert table.select(category="backend", host=HOST_A) == [(api, api)]
    info = table.info(web_b)
    assert info is not None and info.app == "web" and info.describe() == "web@10.1.0.3-10.1.0.3"
    # api's hosts reach only the class of host A: elsewhere it has no label.
    assert table.label_id("api", A("10.1.0.3")) == UNKNOWN


def test_select_refuses_a_prefix_the_table_does_not_know() -> None:
    table = LabelTable.from_policy(THREE, [HOST_A])
    with pytest.raises(ValueError, match="host_prefixes"):
        table.select(host=N("10.1.0.0/30"))
    assert table.select(host=N("0.0.0.0/0")) == table.any_enclave()


def test_too_many_ids_is_an_error() -> None:
    prefixes = [N(f"10.{i // 256}.{i % 256}.0/24") for i in range(300)]
    apps = [AppLabels(f"a{i}", (N("0.0.0.0/0"),)) for i in range(300)]
    with pytest.raises(ValueError, match=str(MAX_ID)):
        LabelTable(apps, prefixes)


def test_duplicate_app_names_are_an_error() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        LabelTable([AppLabels("a", (N("0.0.0.0/0"),)), AppLabels("a", (N("0.0.0.0/0"),))])


prefix = st.builds(
    lambda addr, length: IPv4Network((addr, length), strict=False),
    st.integers(0, (1 << 32) - 1),
    st.integers(0, 32),
)
# Small address space so that hosts, apps and prefixes overlap often.
small_prefix = st.builds(
    lambda addr, length: IPv4Network((0x0A000000 + addr, length), strict=False),
    st.integers(0, 255),
    st.integers(24, 32),
)


@settings(max_examples=200, deadline=None)
@given(
    apps=st.lists(st.lists(small_prefix, min_size=1, max_size=3), min_size=1, max_size=5),
    prefixes=st.lists(small_prefix, max_size=5),
    host=st.integers(0x0A000000, 0x0A0000FF),
)
def test_select_agrees_with_label_id(
    apps: list[list[IPv4Network]], prefixes: list[IPv4Network], host: int
) -> None:
    table = LabelTable([AppLabels(f"app{i}", tuple(h)) for i, h in enumerate(apps)], prefixes)
    for index, hosts in enumerate(apps):
        name = f"app{index}"
        label = table.label_id(name, host)
        if not any(A(host) in h for h in hosts):
            continue  # admission keeps such hosts out; the label may be UNKNOWN
        assert label not in (NONE, UNKNOWN)
        assert any(lo <= label <= hi for lo, hi in table.select(apps=[name]))
        for other in range(len(apps)):
            chosen = table.select(apps=[f"app{other}"])
            assert any(lo <= label <= hi for lo, hi in chosen) == (other == index)
        for p in prefixes:
            chosen = table.select(apps=[name], host=p)
            assert any(lo <= label <= hi for lo, hi in chosen) == (A(host) in p)


@given(st.lists(prefix, max_size=6), st.integers(0, (1 << 32) - 1))
def test_classes_never_straddle_a_prefix(prefixes: list[IPv4Network], host: int) -> None:
    table = LabelTable([AppLabels("all", (N("0.0.0.0/0"),))], prefixes)
    label = table.label_id("all", host)
    info = table.info(label)
    assert info is not None and info.hosts[0] <= host <= info.hosts[1]
    for p in prefixes:
        low, high = int(p.network_address), int(p.broadcast_address)
        inside = low <= info.hosts[0] and info.hosts[1] <= high
        outside = info.hosts[1] < low or info.hosts[0] > high
        assert inside or outside
