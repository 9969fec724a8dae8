"""The validation fast paths of the policy models give exactly what the fields' own schemas
give: the same value, or the same errors (type, position, message, input).

`Networks` validates a whole list in one call, with the cached parser, and leaves anything
it cannot take to pydantic's own schema; `_parse_network` parses canonical addresses and
prefixes itself, into the network ipaddress makes of them; peers and ports try the
common case first."""

from __future__ import annotations

import re
from ipaddress import IPv4Network
from typing import Annotated, Any

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BeforeValidator, TypeAdapter

from seng_fw.policy import models
from seng_fw.policy.models import Networks, _one_or_many

# The fields as they were declared before the fast paths: the reference.
SCHEMA_ONLY = {
    "networks": (
        TypeAdapter(Networks),
        TypeAdapter(Annotated[list[IPv4Network], BeforeValidator(_one_or_many)]),
    ),
}


def _outcome(adapter: TypeAdapter[Any], value: object) -> tuple[str, object]:
    try:
        return "ok", adapter.validate_python(value)
    except pydantic.ValidationError as exc:
        errors = exc.errors(include_url=False)
        for error in errors:  # (exceptions compare by identity: compare what they say)
            ctx = error.get("ctx", {})
            for key, item in ctx.items():
                if isinstance(item, Exception):
                    ctx[key] = (type(item), str(item))
        return "error", errors


def _assert_same(field: str, value: object) -> None:
    fast, reference = SCHEMA_ONLY[field]
    assert _outcome(fast, value) == _outcome(reference, value)


octets = st.one_of(
    st.integers(0, 255).map(str), st.sampled_from(["00", "01", "256", "1e1", "", "x", "٣"])
)
addresses = st.builds(lambda parts: ".".join(parts), st.lists(octets, min_size=3, max_size=5))
prefixes = st.one_of(
    st.just(""),
    st.integers(0, 40).map(lambda n: f"/{n}"),
    st.sampled_from(["/08", "/255.255.0.0", "/0.0.0.255", "/", "/-1", "/ 8", "/8 "]),
)
network_texts = st.one_of(
    st.builds(lambda a, p: a + p, addresses, prefixes),
    st.builds(lambda a, p: f" {a}{p}\n", addresses, prefixes),
    st.text(max_size=20),
)
items = st.one_of(
    network_texts,
    st.integers(-5, 2**33),
    st.booleans(),
    st.none(),
    st.sampled_from(
        [
            "8000-8080",
            " 80 - 90 ",
            "90-80",
            "0",
            "65536",
            {"app": "web"},
            {"category": "x", "host": "10.0.0.0/8"},
            {"gateway": True},
            {"gateway": 1},
            {"app": "Web"},
            IPv4Network("10.0.0.0/8"),
            b"\x0a\x00\x00\x01",
            1.5,
        ]
    ),
)
values = st.one_of(items, st.lists(items, max_size=4))


# IPv4Network(True) warns (as pydantic's validator does on `hosts: yes`): not this test's concern
@pytest.mark.filterwarnings("ignore:__int__ returned non-int:DeprecationWarning")
@settings(max_examples=400, deadline=None)
@given(values)
def test_every_fast_path_gives_what_its_schema_gives(value: object) -> None:
    for field in SCHEMA_ONLY:
        _assert_same(field, value)


@pytest.mark.filterwarnings("ignore:__int__ returned non-int:DeprecationWarning")
@pytest.mark.parametrize(
    "value",
    [
        ["10.0.0.0/8", "bogus", "10.1.2.3/8"],
        [],
        "10.0.0.1/24",
        ["8000-8100", 0, True],
        [{"app": "a"}, "10.0.0.0/33"],
    ],
)
def test_a_value_the_fast_path_refuses_gets_the_schemas_errors(value: object) -> None:
    for field in SCHEMA_ONLY:
        _assert_same(field, value)


@settings(max_examples=2000, deadline=None)
@given(network_texts)
def test_parse_network_is_ipaddress(text: str) -> None:
    models._parse_network.cache_clear()
    try:
        expected: object = IPv4Network(text)
    except ValueError as exc:
        with pytest.raises(ValueError) as raised:
            models._parse_network(text)
        assert str(raised.value) == str(exc)
        return
    parsed = models._parse_network(text)
    assert parsed == expected
    assert (parsed.network_address, parsed.prefixlen) == (
        expected.network_address,  # type: ignore[attr-defined]
        expected.prefixlen,  # type: ignore[attr-defined]
    )
    assert list(parsed.hosts())[:3] == list(expected.hosts())[:3]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (443, (443, 443)),
        (1, (1, 1)),
        (0xFFFF, (0xFFFF, 0xFFFF)),
        ("8000-8080", (8000, 8080)),
        (0, "0: ports are 1..65535 and a range goes low-high"),
        (65536, "65536: ports are 1..65535 and a range goes low-high"),
        (True, "True is not a port"),
        ("x", "'x' is not a port or a port range like 8000-8080"),
    ],
)
def test_port_range_takes_a_port_first_and_refuses_the_rest_as_before(
    value: object, expected: object
) -> None:
    if isinstance(expected, tuple):
        assert models._port_range(value) == expected
    else:
        with pytest.raises(ValueError, match=f"^{re.escape(str(expected))}$"):
            models._port_range(value)


def test_peer_text_is_parsed_first_and_refused_as_before() -> None:
    assert models._peer(" 10.0.0.0/8\n") == IPv4Network("10.0.0.0/8")
    assert models._peer({"app": "web"}) == models.Ref("app", "web")
    refused = re.escape("'10.0.0.1/8' is not an IPv4 address or prefix: ")
    with pytest.raises(ValueError, match=refused):
        models._peer("10.0.0.1/8")


def test_checks_across_apps_find_selectors_among_prefixes_in_file_order() -> None:
    """The checks skip address peers before building their paths: the selectors after
    them keep their own positions, and every kind of owner is still looked at."""
    policy = models.Policy.model_validate(
        {
            "categories": {
                "web": {
                    "egress": [{"to": ["10.0.0.0/8", {"app": "nope"}], "protocol": "any"}],
                    "ingress": [
                        {"from": "10.9.0.0/16", "protocol": "any", "on_hosts": "10.1.0.0/16"}
                    ],
                }
            },
            "apps": [
                {
                    "name": "own",
                    "mrenclave": "00" * 32,
                    "hosts": "10.1.0.0/16",
                    "subnet": {"subnet": "192.168.5.0/24"},
                    "ingress": [
                        {"from": "10.2.0.0/16", "protocol": "tcp"},
                        {"from": "10.3.0.0/16", "protocol": "tcp", "on_hosts": "10.1.2.0/24"},
                    ],
                },
                {
                    "name": "shared",
                    "mrenclave": "11" * 32,
                    "hosts": "10.1.0.0/16",
                    "egress": [
                        {
                            "to": ["1.2.3.4", {"app": "own", "host": "10.1.1.0/24"}],
                            "protocol": "any",
                        }
                    ],
                    "expose": [
                        {
                            "address": "10.9.9.9",
                            "port": 80,
                            "from": ["10.0.0.0/8", {"gateway": True}, {"host": "10.1.3.0/24"}],
                        }
                    ],
                },
            ],
        }
    )
    problems = models.cross_check(policy)
    expected = [
        (("categories", "web", "egress", 0, "to", 1), "unknown app 'nope'"),
        (("apps", 1, "egress", 0, "to", 1), "app 'own' on hosts 10.1.1.0/24 never matches"),
        (("apps", 1, "expose", 0, "from", 1), "{gateway"),
        (("apps", 0, "ingress", 1, "on_hosts"), "the app has its own subnet, where enclaves are"),
    ]
    assert [path for path, _ in problems] == [path for path, _ in expected]
    assert all(
        message.startswith(start)
        for (_, message), (_, start) in zip(problems, expected, strict=True)
    )
    assert policy.host_prefixes() == [
        IPv4Network(prefix)
        for prefix in ("10.1.0.0/16", "10.1.1.0/24", "10.1.2.0/24", "10.1.3.0/24")
    ]
