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
    assert nft_ruleset(QueueRules(SHARED, 4, 4), QueueMode.NFT) == NFT_FOUR_QUEUES


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
        "xtables_chain": "mangle SENG_LABEL",
    }


def test_config_defaults_and_rules() -> None:
    config = LabelConfig()
    assert (config.hook, config.forced_mode()) == ("in_process", None)
    shared = LabelConfig.model_validate({"queues": 4, "queue_mode": "xtables"})
    assert shared.queue_rules(SHARED).queues == [0, 1, 2, 3]
    assert shared.forced_mode() is QueueMode.XTABLES
    with pytest.raises(ValueError):
        LabelConfig.model_validate({"queue_mode": "labelled"})
    with pytest.raises(ValueError):  # the mode is the gateway's (GatewayConfig.mode)
        LabelConfig.model_validate({"mode": "shared"})
