"""JSON logs carry the fields of each gateway event (event, app, enclave, address, host,
check) through `extra=`, not only in the message (issue 13, logs)."""

from __future__ import annotations

import json
import logging

import pytest

from seng_fw.policy.admission import Admission
from seng_fw.policy.models import Policy
from seng_fw.system.logs import JsonFormatter
from tests.support.gateway_memory import MemoryGateway
from tests.unit.test_gateway_core import NGINX, UNKNOWN, WEBAPP, policy


def _events(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    formatter = JsonFormatter()
    return [json.loads(formatter.format(record)) for record in caplog.records]


def test_admission_rejection_and_end_carry_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="seng_fw")
    gateway = MemoryGateway(policy())
    enclave = gateway.enclave(gateway.cert(WEBAPP)).connect()
    gateway.enclave(gateway.cert(UNKNOWN)).open_uplink()
    gateway.pump()
    events = {str(e.get("event")): e for e in _events(caplog) if "event" in e}
    admitted = events["admitted"]
    assert admitted["app"] == "webapp" and admitted["enclave"] == WEBAPP.hex()
    assert admitted["address"] == str(enclave.address) and admitted["host"] == "10.0.0.10"
    assert events["leased"]["address"] == str(enclave.address)
    assert events["rejected"]["check"] == "unknown_mrenclave"
    assert events["rejected"]["host"] == "10.0.0.10"


def test_a_reload_and_a_revocation_say_which(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="seng_fw")
    gateway = MemoryGateway(policy())
    gateway.enclave(gateway.cert(WEBAPP)).connect()
    gateway.enclave(gateway.cert(NGINX)).connect()
    data = policy()
    data["apps"] = [app for app in data["apps"] if app["name"] != "nginx"]
    gateway.core.reload(Admission(Policy.model_validate(data)), gateway.now)
    data["apps"] = []
    gateway.core.reload(Admission(Policy.model_validate(data)), gateway.now, "revocation")
    closing = [e for e in _events(caplog) if str(e["message"]).find("closing") >= 0]
    assert [(e["event"], e["app"]) for e in closing] == [
        ("policy_reload", "nginx"), ("revocation", "webapp"),
    ]  # fmt: skip
    assert str(closing[1]["message"]).startswith("revocation: closing app=webapp")
    assert all(e["check"] for e in closing)
