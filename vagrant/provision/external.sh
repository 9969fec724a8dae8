#!/bin/sh
# The external host: a route back to the enclave subnets through the gateway, and
# TCP and UDP echo services on port 7 (the servers the enclaves try to reach).
#
#   SENG_FW_PYTHON   the interpreter seng-fw is installed in   (/opt/seng-fw/bin/python)
#   SENG_FW_VIA      the gateway's external address            (10.77.2.1)
#   SENG_FW_BIND     this host's address for the services      (10.77.2.2)
#   SENG_FW_SYSTEMD  1: the services run as a transient systemd service
set -eu
PYTHON=${SENG_FW_PYTHON:-/opt/seng-fw/bin/python}
VIA=${SENG_FW_VIA:-10.77.2.1}
BIND=${SENG_FW_BIND:-10.77.2.2}
SYSTEMD=${SENG_FW_SYSTEMD:-1}

ip route replace 192.168.0.0/16 via "$VIA"
set -- "$PYTHON" -m seng_fw.lab.services --bind "$BIND" --tcp 7 --udp 7
if [ "$SYSTEMD" = 1 ]; then
    systemctl stop seng-echo 2>/dev/null || true
    systemctl reset-failed seng-echo 2>/dev/null || true
    systemd-run --unit seng-echo --property Restart=always "$@"
else
    nohup "$@" >/dev/null 2>&1 &
fi
echo "echo services on $BIND tcp/udp 7; enclave subnets via $VIA"
