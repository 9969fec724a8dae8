"""The gateway's side of the labeller, in one object with the hook points it needs.

    labelling = Labelling(config.label, policy, gateway_addresses=[...])
    await labelling.start()          # install queue rules, start the hook or the server
    labelling.admitted(enclave)      # an address was leased to an admitted enclave
    labelling.released(address)      # before the address's conntrack entries are flushed
    labelling.policy_changed(policy) # in the same loop step as the new ruleset's apply
    labelling.status()               # for `seng-fw status`
    await labelling.stop()

With `hook: in_process` the NFQUEUE hook runs on the gateway's event loop; with
`hook: service` a `LabelRegistryServer` serves the registry to `python -m seng_fw.label`
processes, which bind the queues.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network
from typing import TYPE_CHECKING, Any

from seng_fw.label.config import LabelConfig
from seng_fw.label.hook import LabelHook
from seng_fw.label.install import Installed, install, rate_limited, remove
from seng_fw.label.registry import EnclaveLike, LabelRegistryServer, Registry, Scope, record_for
from seng_fw.policy.labels import LabelTable

if TYPE_CHECKING:
    from seng_fw.policy.models import Policy


class Labelling:
    def __init__(
        self,
        config: LabelConfig,
        policy: Policy,
        *,
        gateway_addresses: Iterable[IPv4Address] = (),
        host_prefixes: Iterable[IPv4Network] = (),
        netns: str | None = None,
    ) -> None:
        self.config = config
        self.netns = netns
        self.shared = policy.shared_subnet.subnet
        own = {policy.shared_subnet.gateway_address, *gateway_addresses}
        self.table = LabelTable.from_policy(policy, host_prefixes)
        self.registry = Registry(Scope(self.shared, frozenset(own)))
        self.installed: Installed | None = None
        self.hook: LabelHook | None = None
        self.server: LabelRegistryServer | None = None

    async def start(self) -> None:
        rules = self.config.queue_rules(self.shared)
        self.installed = install(rules, mode=self.config.forced_mode(), netns=self.netns)
        if self.config.hook == "in_process":
            self.hook = LabelHook(
                self.registry,
                rules.queues,
                netns=self.netns,
                batch=self.config.batch,
                max_len=self.config.max_len,
            )
            self.hook.start()
        else:
            self.server = LabelRegistryServer(self.registry, self.config.socket)
            await self.server.start()

    async def stop(self, *, remove_rules: bool = False) -> None:
        """Stop labelling. The queue rules stay unless `remove_rules`: with them, new
        connections of the shared subnet are dropped until a labeller binds again."""
        if self.hook is not None:
            self.hook.stop()
            self.hook = None
        if self.server is not None:
            await self.server.close()
            self.server = None
        if remove_rules and self.installed is not None:
            remove(self.installed)
            self.installed = None

    # --- hook points ----------------------------------------------------------------

    def admitted(self, enclave: EnclaveLike) -> None:
        self.registry.add(record_for(enclave, self.table))

    def released(self, address: IPv4Address) -> None:
        """Forget the address. Call it before `seng_fw.gateway.conntrack.flush_address(address)`:
        the other order lets a connection opened in between keep the old label."""
        self.registry.remove(address)

    def policy_changed(self, policy: Policy, host_prefixes: Iterable[IPv4Network] = ()) -> None:
        self.table = LabelTable.from_policy(policy, host_prefixes)
        self.registry.relabel(self.table)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": "shared",
            "hook": self.config.hook,
            "enclaves": len(self.registry),
            "label_ids": len(self.table),
        }
        if self.installed is not None:
            out.update(self.installed.to_json())
        if self.hook is not None:
            out["counters"] = self.hook.counters()
        if self.installed is not None and self.installed.rules.per_source_rate:
            limited = rate_limited(self.netns)
            if limited is not None:  # the kernel has our table (else: nothing to report)
                out.setdefault("counters", {})["rate_limited"] = limited
        if self.server is not None:
            out["services"] = self.server.client_stats
        return out
