"""The queue rules as text: what `install` loads in each mode (the kernel checks them in
tests/integration/test_label_install.py)."""

from __future__ import annotations

from ipaddress import IPv4Network

import pytest

from seng_fw.label.config import LabelConfig
from seng_fw.label.install import Installed, QueueMode, QueueRules, nft_ruleset, xtables_restore

SHARED = IPv4Network("192.168.28.0/24")

NFT_FOUR_QUEUES = """\
add table ip seng_label
delete table ip seng_label
table ip seng_label {
	chain queue_forward {
		type filter hook forward priority mangle; policy accept;
		ct state new ip saddr 192.168.28.0/24 queue num 4-7
		ct state new ip daddr 192.168.28.0/24 queue num 4-7
	}
	chain mark_forward {
		type filter hook forward priority mangle + 10; policy accept;
		ct state new ip saddr 192.168.28.0/24 ct mark set meta mark
		ct state new ip daddr 192.168.28.0/24 ct mark set meta mark
	}
	chain queue_input {
		type filter hook input priority mangle; policy accept;
		ct state new ip saddr 192.168.28.0/24 queue num 4-7
		ct state new ip daddr 192.168.28.0/24 queue num 4-7
	}
	chain mark_input {
		type filter hook input priority mangle + 10; policy accept;
		ct state new ip saddr 192.168.28.0/24 ct mark set meta mark
		ct state new ip daddr 192.168.28.0/24 ct mark set meta mark
	}
	chain queue_output {
		type filter hook output priority mangle; policy accept;
		ct state new ip saddr 192.168.28.0/24 queue num 4-7
		ct state new ip daddr 192.168.28.0/24 queue num 4-7
	}
	chain mark_output {
		type filter hook output priority mangle + 10; policy accept;
		ct state new ip saddr 192.168.28.0/24 ct mark set meta mark
		ct state new ip daddr 192.168.28.0/24 ct mark set meta mark
	}
}
"""


def test_nft_mode_ruleset() -> None:
    unlimited = QueueRules(SHARED, 4, 4, per_source_rate=0)
    assert nft_ruleset(unlimited, QueueMode.NFT) == NFT_FOUR_QUEUES


LIMIT_FORWARD = """\
	chain limit_forward {
		type filter hook forward priority mangle - 10; policy accept;
		ct state new ip saddr 192.168.28.0/24 update @new_by_source { ip saddr limit rate over 300/second burst 50 packets } counter name rate_limited drop
		ct state new ip daddr 192.168.28.0/24 update @new_by_source { ip saddr limit rate over 300/second burst 50 packets } counter name rate_limited drop
	}
"""  # noqa: E501


@pytest.mark.parametrize("mode", list(QueueMode))
def test_per_source_rate_limit_runs_ahead_of_the_queue_in_both_modes(mode: QueueMode) -> None:
    text = nft_ruleset(QueueRules(SHARED, 0, 1, 300, 50), mode)
    assert "\tcounter rate_limited { }\n" in text
    assert "set new_by_source { type ipv4_addr;" in text and "flags dynamic,timeout;" in text
    assert LIMIT_FORWARD in text
    for hook in ("forward", "input", "output"):
        assert f"chain limit_{hook} {{\n\t\ttype filter hook {hook} priority mangle - 10;" in text
    # on by default; the unlimited ruleset is the one above
    assert "limit rate over 2000/second burst 500 packets" in nft_ruleset(
        QueueRules(SHARED), mode
    )
    assert "limit" not in nft_ruleset(QueueRules(SHARED, per_source_rate=0), mode)


def test_nft_mode_never_bypasses_and_single_queue() -> None:
    text = nft_ruleset(QueueRules(SHARED, 3), QueueMode.NFT)
    assert "queue num 3\n" in text and "bypass" not in text and "fanout" not in text


def test_xtables_mode_only_copies_marks_in_nft() -> None:
    text = nft_ruleset(QueueRules(SHARED, 0, 2), QueueMode.XTABLES)
    assert "queue" not in text.replace("chain queue", "")
    assert text.count("ct mark set meta mark") == 6


def test_xtables_restore() -> None:
    assert xtables_restore(QueueRules(SHARED, 0, 2)) == (
        "*mangle\n"
        ":SENG_LABEL - [0:0]\n"
        "-A SENG_LABEL -s 192.168.28.0/24 -m conntrack --ctstate NEW"
        " -j NFQUEUE --queue-balance 0:1\n"
        "-A SENG_LABEL -d 192.168.28.0/24 -m conntrack --ctstate NEW"
        " -j NFQUEUE --queue-balance 0:1\n"
        '-I FORWARD 1 -m comment --comment "seng-fw labeller" -j SENG_LABEL\n'
        '-I INPUT 1 -m comment --comment "seng-fw labeller" -j SENG_LABEL\n'
        '-I OUTPUT 1 -m comment --comment "seng-fw labeller" -j SENG_LABEL\n'
        "COMMIT\n"
    )  # fmt: skip
    single = xtables_restore(QueueRules(SHARED, 9))
    assert "--queue-num 9 " not in single and "--queue-num 9\n" in single
    assert "bypass" not in single


@pytest.mark.parametrize(("first", "count"), [(0, 0), (-1, 1), (0xFFFF, 2)])
def test_bad_queue_ranges(first: int, count: int) -> None:
    with pytest.raises(ValueError):
        QueueRules(SHARED, first, count)


def test_status_json() -> None:
    installed = Installed(QueueMode.XTABLES, QueueRules(SHARED, 2, 2))
    assert installed.to_json() == {
        "queue_mode": "xtables",
        "queues": [2, 3],
        "shared_subnet": "192.168.28.0/24",
        "table": "ip seng_label",
        "new_connections_per_source": 2000,
        "xtables_chain": "mangle SENG_LABEL",
    }
    unlimited = Installed(QueueMode.NFT, QueueRules(SHARED, per_source_rate=0)).to_json()
    assert unlimited["new_connections_per_source"] is None


def test_config_defaults_and_rules() -> None:
    config = LabelConfig()
    assert (config.hook, config.forced_mode()) == ("in_process", None)
    shared = LabelConfig.model_validate({"queues": 4, "queue_mode": "xtables"})
    assert shared.queue_rules(SHARED).queues == [0, 1, 2, 3]
    assert shared.forced_mode() is QueueMode.XTABLES
    limited = LabelConfig.model_validate(
        {"new_connections_per_source": 10, "new_connections_burst": 5}
    ).queue_rules(SHARED)
    assert (limited.per_source_rate, limited.per_source_burst) == (10, 5)
    assert config.queue_rules(SHARED).per_source_rate == 2000
    with pytest.raises(ValueError):
        LabelConfig.model_validate({"new_connections_per_source": -1})
    with pytest.raises(ValueError):
        LabelConfig.model_validate({"queue_mode": "labelled"})
    with pytest.raises(ValueError):  # the mode is the gateway's (GatewayConfig.mode)
        LabelConfig.model_validate({"mode": "shared"})
