#!/bin/sh
# Every lab VM: Debian packages and seng-fw itself (`make install`: /opt/seng-fw,
# /usr/local/bin/seng-fw). The source is the repository synced to $SENG_FW_SRC; it is
# copied first so that the build leaves nothing in the synced folder.
set -eu
SRC=${SENG_FW_SRC:-/seng-fw}

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends \
    python3 python3-venv python3-dev gcc make rsync \
    nftables iptables conntrack iproute2 libnetfilter-queue-dev libnfnetlink-dev \
    netcat-openbsd curl iputils-ping

rsync -a --delete --exclude .git --exclude .venv --exclude 'vagrant/.lab' \
    "$SRC/" /usr/local/src/seng-fw/
make -C /usr/local/src/seng-fw install
