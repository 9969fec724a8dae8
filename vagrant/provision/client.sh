#!/bin/sh
# A client host: RA-TLS certificates from the lab CA, and emulated enclaves (SENG
# clients with a TUN device each) connected to the gateway.
#
#   SENG_FW          the seng-fw command                      (seng-fw)
#   SENG_FW_SHARED   lab CA and gateway certificate           (/seng-fw/vagrant/.lab)
#   SENG_FW_GATEWAY  the gateway's tunnel #1 address          (10.77.1.1:12345)
#   SENG_FW_STATE    enclave certificates, keys, state files  (/var/lib/seng-fw-enclaves)
#   SENG_FW_ENCLAVES NAME:MRENCLAVE[:MRSIGNER] ...            (the demo policy's two apps)
#   SENG_FW_SYSTEMD  1: each enclave is a transient systemd service, restarted when it
#                    ends; 0: a background process (pid in STATE/NAME/pid)
set -eu
SENG_FW=${SENG_FW:-seng-fw}
SHARED=${SENG_FW_SHARED:-/seng-fw/vagrant/.lab}
GATEWAY=${SENG_FW_GATEWAY:-10.77.1.1:12345}
STATE=${SENG_FW_STATE:-/var/lib/seng-fw-enclaves}
SIGNER=cca10cf28996a5eb229670e348fae1c738b116fb396593156ef0af019252bfde
ENCLAVES=${SENG_FW_ENCLAVES:-"webapp:bfcb952ccc697d9fd928a0bfa1aea2c15ce85d41c0873968c8aae66695510de6 nginx:12c74a7260c0236c2f8d618680a2f1cdd16010f3951b7c21d87217e877343089"}
SYSTEMD=${SENG_FW_SYSTEMD:-1}

index=0
for spec in $ENCLAVES; do
    name=${spec%%:*}
    rest=${spec#*:}
    mrenclave=${rest%%:*}
    mrsigner=$SIGNER
    [ "$rest" = "$mrenclave" ] || mrsigner=${rest#*:}
    dir="$STATE/$name"
    if [ ! -f "$dir/cert.pem" ]; then
        $SENG_FW lab enclave-cert --ca "$SHARED/ca" --mrenclave "$mrenclave" \
            --mrsigner "$mrsigner" --out "$dir" >/dev/null
    fi
    set -- lab enclave --server "$GATEWAY" --server-cert "$SHARED/gateway.pem" \
        --cert "$dir/cert.pem" --key "$dir/key.pem" --tun "se$index" \
        --state-file "$dir/state.json"
    if [ "$SYSTEMD" = 1 ]; then
        systemctl stop "seng-enclave-$name" 2>/dev/null || true
        systemctl reset-failed "seng-enclave-$name" 2>/dev/null || true
        systemd-run --unit "seng-enclave-$name" --property Restart=always \
            --property RestartSec=5 $SENG_FW "$@"
    else
        nohup $SENG_FW "$@" >"$dir/enclave.log" 2>&1 &
        echo $! >"$dir/pid"
    fi
    echo "enclave $name (MRENCLAVE $mrenclave) -> $GATEWAY, state in $dir/state.json"
    index=$((index + 1))
done
