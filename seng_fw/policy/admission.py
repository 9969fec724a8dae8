"""Admission: which app an attested enclave belongs to, and whether it may connect from
the client host it connects from. Pure logic; the gateway calls it after attestation."""

from __future__ import annotations

import enum
from ipaddress import IPv4Address

from seng_fw.attest.identity import EnclaveIdentity
from seng_fw.policy.models import App, Policy


class AdmissionCheck(enum.StrEnum):
    """Stable names of the admission rules (counters, logs, metrics labels)."""

    UNKNOWN_MRENCLAVE = "unknown_mrenclave"
    MRSIGNER_MISMATCH = "mrsigner_mismatch"
    ISV_PROD_ID_MISMATCH = "isv_prod_id_mismatch"
    ISV_SVN_TOO_LOW = "isv_svn_too_low"
    DEBUG_ENCLAVE = "debug_enclave"
    HOST_NOT_ALLOWED = "host_not_allowed"
    REVOKED_BY_OPERATOR = "revoked_by_operator"  # seng_fw.gateway.service's revocations


class AdmissionRejected(Exception):
    """The enclave is attested but the policy does not admit it. `check` names the rule."""

    def __init__(self, check: AdmissionCheck, message: str) -> None:
        super().__init__(f"{check}: {message}")
        self.check = check
        self.message = message


class Admission:
    """Decides admission against one policy; built once per policy (re)load."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._app_by_mrenclave = {m: app for app in policy.apps for m in app.mrenclave}

    def admit(self, identity: EnclaveIdentity, host: IPv4Address) -> App:
        app = self._app_by_mrenclave.get(identity.mrenclave)
        if app is None:
            raise AdmissionRejected(
                AdmissionCheck.UNKNOWN_MRENCLAVE,
                f"MRENCLAVE {identity.mrenclave.hex()} is not in the policy",
            )
        if app.mrsigner is not None and identity.mrsigner != app.mrsigner:
            raise AdmissionRejected(
                AdmissionCheck.MRSIGNER_MISMATCH,
                f"app {app.name}: MRSIGNER {identity.mrsigner.hex()} is not {app.mrsigner.hex()}",
            )
        if app.isv_prod_id is not None and identity.isv_prod_id != app.isv_prod_id:
            raise AdmissionRejected(
                AdmissionCheck.ISV_PROD_ID_MISMATCH,
                f"app {app.name}: ISVPRODID {identity.isv_prod_id} is not {app.isv_prod_id}",
            )
        if identity.isv_svn < app.min_isv_svn:
            raise AdmissionRejected(
                AdmissionCheck.ISV_SVN_TOO_LOW,
                f"app {app.name}: ISVSVN {identity.isv_svn} is below {app.min_isv_svn}",
            )
        if identity.debug and not app.allow_debug:
            raise AdmissionRejected(
                AdmissionCheck.DEBUG_ENCLAVE, f"app {app.name}: DEBUG enclaves are not allowed"
            )
        if not any(host in hosts for hosts in app.hosts):
            raise AdmissionRejected(
                AdmissionCheck.HOST_NOT_ALLOWED,
                f"app {app.name}: client host {host} is not in its hosts",
            )
        return app
