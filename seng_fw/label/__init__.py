"""Identity labelling of the shared enclave subnet (SENG Netfilter parity).

An NFQUEUE hook sees the first packet of each new connection from or to the shared
subnet and sets the connection's conntrack mark to the label ids of both ends
(`marks`), looked up in the gateway's live registry of enclaves (`registry`); the
compiled ruleset matches the marks. `install` puts the queue rules in place (nftables
queue statement or the xtables NFQUEUE target), `hook` is the queue listener,
`labelling` the gateway's hook points, `service` the labeller as its own process.
"""
