"""The `label:` section of the gateway configuration: how the NFQUEUE labeller runs when
the gateway's `mode` is `shared`."""

from __future__ import annotations

from ipaddress import IPv4Network
from pathlib import Path
from typing import Literal

from pydantic import Field

from seng_fw.label.hook import DEFAULT_BATCH, DEFAULT_MAX_LEN
from seng_fw.label.install import (
    DEFAULT_PER_SOURCE_BURST,
    DEFAULT_PER_SOURCE_RATE,
    QueueMode,
    QueueRules,
)
from seng_fw.label.registry import DEFAULT_SOCKET
from seng_fw.policy.models import StrictModel


class LabelConfig(StrictModel):
    # in_process: the gateway runs the NFQUEUE hook itself; service: a separate
    # `python -m seng_fw.label` process follows the registry over `socket`.
    hook: Literal["in_process", "service"] = "in_process"
    socket: Path = DEFAULT_SOCKET
    # NFQUEUE numbers first_queue .. first_queue + queues - 1 (fan-out by flow hash).
    first_queue: int = Field(default=0, ge=0, le=0xFFFF)
    queues: int = Field(default=1, ge=1, le=64)
    # auto: the nftables queue statement where the kernel has it, else iptables-nft.
    queue_mode: Literal["auto", "nft", "xtables"] = "auto"
    batch: int = Field(default=DEFAULT_BATCH, ge=1, le=4096)
    max_len: int = Field(default=DEFAULT_MAX_LEN, ge=16, le=1 << 20)
    # New connections a second that one source address may open through the queue (the
    # excess is dropped and counted as `rate_limited`), so that one enclave's flood of new
    # connections cannot fill the shared queue and starve the others; 0 turns it off.
    new_connections_per_source: int = Field(default=DEFAULT_PER_SOURCE_RATE, ge=0, le=1 << 24)
    new_connections_burst: int = Field(default=DEFAULT_PER_SOURCE_BURST, ge=1, le=1 << 24)

    def queue_rules(self, shared: IPv4Network) -> QueueRules:
        return QueueRules(
            shared,
            self.first_queue,
            self.queues,
            self.new_connections_per_source,
            self.new_connections_burst,
        )

    def forced_mode(self) -> QueueMode | None:
        return None if self.queue_mode == "auto" else QueueMode(self.queue_mode)
