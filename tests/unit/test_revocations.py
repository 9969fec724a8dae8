"""Revocations persist (JsonFileRevocationStore), survive a restart of the gateway's
service, and list who revoked what, when and why."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from seng_fw.gateway.revocations import (
    JsonFileRevocationStore,
    Revocation,
    RevocationStoreError,
    write_atomically,
)
from seng_fw.gateway.service import REVOKED_CHECK
from tests.support.gateway_service import NGINX, WEBAPP, Gateway


@pytest.fixture
def store(tmp_path: Path) -> JsonFileRevocationStore:
    return JsonFileRevocationStore(tmp_path / "state" / "revocations.json")


def test_the_store_round_trips_and_starts_empty(store: JsonFileRevocationStore) -> None:
    assert store.load() == []
    items = [
        Revocation("app", "webapp", "root (uid=0 gid=0 pid=1)", "2027-01-15T08:00:00Z", "leak"),
        Revocation("enclave", "192.168.29.2", "x", "t", app="webapp", host="10.0.0.1",
                   fingerprint="ab" * 32),
    ]  # fmt: skip
    store.save(items)
    assert store.load() == items
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o640
    assert os.listdir(store.path.parent) == ["revocations.json"]  # no temporary left


@pytest.mark.parametrize(
    "text", ["{", "[]", '{"schema": 2, "revocations": []}', '{"schema": 1, "revocations": [{}]}']
)
def test_a_damaged_store_is_refused(store: JsonFileRevocationStore, text: str) -> None:
    store.path.parent.mkdir()
    store.path.write_text(text)
    with pytest.raises(RevocationStoreError, match="damaged"):
        store.load()


def test_a_failed_write_leaves_the_old_file(
    store: JsonFileRevocationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.save([Revocation("app", "webapp", "x", "t")])
    before = store.path.read_bytes()

    def crash(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        write_atomically(store.path, b"new")
    assert store.path.read_bytes() == before
    assert os.listdir(store.path.parent) == ["revocations.json"]


def test_revocations_survive_a_restart(tmp_path: Path, store: JsonFileRevocationStore) -> None:
    first = Gateway(tmp_path, store=store)
    first.add("webapp", WEBAPP)
    nginx = first.add("nginx", NGINX, host="10.0.0.20", nonce=3)
    result = asyncio.run(first.control.revoke(app="webapp", reason="key leaked", by="root (uid=0)"))
    assert result["saved"] is True and len(result["ended"]) == 1
    asyncio.run(first.control.revoke(address=str(nginx.address), by="alice (uid=1000)"))
    # A new gateway process with the same store: both still refused, others admitted.
    second = Gateway(tmp_path, store=store)
    assert second.admit(WEBAPP) == REVOKED_CHECK
    assert second.admit(NGINX, host="10.0.0.20", nonce=3) == REVOKED_CHECK
    assert second.admit(NGINX, host="10.0.0.20", nonce=4) == "nginx"  # restarted enclave
    listed = second.control.revocation_list()
    assert [(r["kind"], r["target"], r["by"], r.get("reason")) for r in listed] == [
        ("app", "webapp", "root (uid=0)", "key leaked"),
        ("enclave", str(nginx.address), "alice (uid=1000)", ""),
    ]
    assert listed[0]["at"] == "2027-01-15T08:00:00Z"
    # --clear is saved too.
    asyncio.run(second.control.revoke(clear=True))
    assert Gateway(tmp_path, store=store).admit(WEBAPP) == "webapp"
    assert json.loads(store.path.read_text())["revocations"] == []


class FullDisk:
    """A store that reads fine and cannot write (root ignores file modes)."""

    def load(self) -> list[Revocation]:
        return []

    def save(self, revocations: Sequence[Revocation]) -> None:
        raise RevocationStoreError("cannot write revocations.json: No space left on device")


def test_an_unsaved_revocation_still_holds_and_says_so(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path, store=FullDisk())
    result = asyncio.run(gateway.control.revoke(app="webapp"))
    assert result["saved"] is False and "not saved" in result["warning"]
    assert gateway.admit(WEBAPP) == REVOKED_CHECK


def test_an_unreadable_store_stops_the_service_from_starting(
    tmp_path: Path, store: JsonFileRevocationStore
) -> None:
    store.path.parent.mkdir()
    store.path.write_text("not json")
    with pytest.raises(RevocationStoreError):
        Gateway(tmp_path, store=store)


class SlowFirstSave:
    """A store whose first save takes longer than the next (a slow disk, a busy thread
    pool): what it holds in the end is the last list that reached it."""

    def __init__(self) -> None:
        self.saved: list[list[str]] = []
        self.calls = 0

    def load(self) -> list[Revocation]:
        return []

    def save(self, revocations: Sequence[Revocation]) -> None:
        self.calls += 1
        if self.calls == 1:
            time.sleep(0.3)
        self.saved.append([r.target for r in revocations])


def test_revokes_at_once_save_the_latest_list_last(tmp_path: Path) -> None:
    store = SlowFirstSave()
    gateway = Gateway(tmp_path, store=store)

    async def both() -> None:
        await asyncio.gather(
            gateway.control.revoke(app="webapp"), gateway.control.revoke(app="nginx")
        )

    asyncio.run(both())
    assert sorted(store.saved[-1]) == ["nginx", "webapp"]
