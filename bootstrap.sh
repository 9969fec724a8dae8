#!/usr/bin/env bash
# Sets seng-fw up on a fresh Debian machine: system packages (when run as root),
# a virtual environment in .venv, and the project with its test tools in it.
# Safe to run again: every step is idempotent.
set -euo pipefail
cd "$(dirname "$0")"

DEBIAN_PACKAGES=(
    python3 python3-venv python3-dev gcc          # venv, and building NetfilterQueue
    nftables                                       # nft and libnftables1 (ruleset loading)
    iptables                                       # iptables-nft: NFQUEUE where nft lacks `queue`
    conntrack iproute2 procps                      # kernel state, namespaces, sysctl
    libnetfilter-queue-dev libnfnetlink-dev        # NetfilterQueue build
    iperf3 netcat-openbsd curl iputils-ping        # lab traffic and benchmarks
    openvpn linux-perf                             # bench_datapath.py's contender; profiles
    systemd vagrant                                # unit tests (systemd-analyze), vagrant validate
    groff-base man-db                              # unit tests: the manual page renders cleanly
)

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${DEBIAN_PACKAGES[@]}"
else
    echo "bootstrap: not root or no apt-get; assuming these are installed: ${DEBIAN_PACKAGES[*]}" >&2
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev,netfilter,bench]'
echo "bootstrap: ready ($(.venv/bin/seng-fw --help >/dev/null && echo seng-fw installed in .venv))"
