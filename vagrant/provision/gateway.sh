#!/bin/sh
# The gateway: configuration, DTLS credentials, policy, and the systemd service.
#
# Plain seng-fw commands, parameterised by environment variables so that the
# namespace lab runs the same script (tests/integration/test_ops_provision.py, with
# SENG_FW_SYSTEMD=0: everything but the service, which the test then starts with the
# unit's ExecStart command line).
#
#   SENG_FW          the seng-fw command            (seng-fw)
#   SENG_FW_ETC      configuration directory        (/etc/seng-fw)
#   SENG_FW_SHARED   exchange with the client hosts: lab CA, gateway certificate
#                    (/seng-fw/vagrant/.lab, a folder every VM sees)
#   SENG_FW_LISTEN   tunnel address and port        (10.77.1.1:12345)
#   SENG_FW_POLICY   the policy to install          (/seng-fw/policies/lab/demo.yaml)
#   SENG_FW_SYSTEMD  1: install and start the units (1)
set -eu
SENG_FW=${SENG_FW:-seng-fw}
ETC=${SENG_FW_ETC:-/etc/seng-fw}
SHARED=${SENG_FW_SHARED:-/seng-fw/vagrant/.lab}
LISTEN=${SENG_FW_LISTEN:-10.77.1.1:12345}
POLICY=${SENG_FW_POLICY:-/seng-fw/policies/lab/demo.yaml}
SYSTEMD=${SENG_FW_SYSTEMD:-1}

mkdir -p "$SHARED"
printf '*\n' > "$SHARED/.gitignore"   # lab keys never go into the repository
if [ ! -f "$SHARED/ca/lab-attestation-root.pem" ]; then
    $SENG_FW lab ca init "$SHARED/ca"
fi
# (With SENG_FW_SYSTEMD=1, common.sh's `make install` has run `seng-fw install-units`:
# the seng-fw group exists, so init gives it read access to the key.)
$SENG_FW init --dir "$ETC" --listen "$LISTEN" \
    --root "$SHARED/ca/lab-attestation-root.pem" --policy "$POLICY"
cp "$ETC/server.pem" "$SHARED/gateway.pem"   # the clients pin it
$SENG_FW check "$ETC/policies"

if [ "$SYSTEMD" = 1 ]; then
    systemctl enable --now seng-fw-policy.service seng-fw.service
    $SENG_FW status
fi
