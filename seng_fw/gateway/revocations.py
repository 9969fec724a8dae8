"""Operator revocations: who may not connect although the policy admits them, who
revoked them, when and why; kept in a `RevocationStore` so that they survive restarts.

A revocation names an app, a build (MRENCLAVE) or one enclave instance (its client host
and attestation evidence: a restarted enclave attests afresh and may come back unless
its app or build is revoked). `RevocableAdmission` refuses what is revoked with the
check `revoked_by_operator`; policy reloads keep revocations; `seng-fw revoke --clear`
lifts them all.

The store is an interface: `JsonFileRevocationStore` keeps them in one JSON file
(default /var/lib/seng-fw/revocations.json), written atomically (temporary file in the
same directory, fsync, rename, fsync of the directory), so that a crash leaves the old
list or the new one, never half of either. A store shared by several gateways (HA)
would implement the same two methods.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Literal, Protocol

from seng_fw.attest.identity import EnclaveIdentity
from seng_fw.policy.admission import Admission, AdmissionCheck, AdmissionRejected
from seng_fw.policy.models import App, Policy

DEFAULT_REVOCATIONS_FILE = Path("/var/lib/seng-fw/revocations.json")
SCHEMA = 1

Kind = Literal["app", "mrenclave", "enclave"]


class RevocationStoreError(Exception):
    """The stored revocations cannot be read or written (the text says why)."""


def identity_fingerprint(identity: EnclaveIdentity) -> str:
    """SHA-256 of an enclave's attestation evidence, as stored for an instance."""
    text = json.dumps(identity.to_json(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Revocation:
    kind: Kind
    target: str  # the app's name, the MRENCLAVE (hex) or the enclave's address
    by: str  # who: the control socket's peer (user, uid, pid)
    at: str  # when: ISO 8601, UTC
    reason: str = ""  # why, in the operator's words
    # enclave only: what identifies the instance across its address being reused
    app: str | None = None
    host: str | None = None
    fingerprint: str | None = None

    def describe(self) -> str:
        if self.kind == "enclave":
            return f"enclave {self.target} (app {self.app}, host {self.host})"
        return f"{self.kind} {self.target}"

    def to_json(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_json(cls, data: Any) -> Revocation:
        if not isinstance(data, dict) or data.get("kind") not in ("app", "mrenclave", "enclave"):
            raise ValueError(f"not a revocation: {data!r}")
        fields = {"kind", "target", "by", "at", "reason", "app", "host", "fingerprint"}
        values = {key: data[key] for key in fields if key in data}
        if not all(isinstance(value, str) for value in values.values()):
            raise ValueError(f"not a revocation: {data!r}")
        revocation = cls(**values)
        if revocation.kind == "enclave" and (revocation.host is None or not revocation.fingerprint):
            raise ValueError(f"an enclave revocation needs host and fingerprint: {data!r}")
        return revocation


@dataclass
class Revocations:
    """The revocations in force, indexed for admission."""

    items: list[Revocation] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._reindex()

    def _reindex(self) -> None:
        self._apps = {r.target for r in self.items if r.kind == "app"}
        self._mrenclaves = {r.target for r in self.items if r.kind == "mrenclave"}
        self._instances = {(r.host, r.fingerprint): r for r in self.items if r.kind == "enclave"}

    @property
    def apps(self) -> frozenset[str]:
        return frozenset(self._apps)

    def add(self, revocation: Revocation) -> None:
        self.items.append(revocation)
        self._reindex()

    def clear(self) -> int:
        count = len(self.items)
        self.items.clear()
        self._reindex()
        return count

    def reason(self, app: str, identity: EnclaveIdentity, host: IPv4Address) -> str | None:
        if app in self._apps:
            return f"app {app} was revoked by the operator"
        if identity.mrenclave.hex() in self._mrenclaves:
            return f"MRENCLAVE {identity.mrenclave.hex()} was revoked by the operator"
        if self._instances:
            instance = self._instances.get((str(host), identity_fingerprint(identity)))
            if instance is not None:
                return f"{instance.describe()} was revoked by the operator"
        return None

    def describe(self) -> list[str]:
        order = {"app": 0, "mrenclave": 1, "enclave": 2}
        ordered = sorted(self.items, key=lambda r: (order[r.kind], r.target))
        return [revocation.describe() for revocation in ordered]

    def to_json(self) -> list[dict[str, Any]]:
        return [revocation.to_json() for revocation in self.items]


class RevocableAdmission(Admission):
    """The policy's admission, minus what the operator revoked."""

    def __init__(self, policy: Policy, revocations: Revocations) -> None:
        super().__init__(policy)
        self.revocations = revocations

    def admit(self, identity: EnclaveIdentity, host: IPv4Address) -> App:
        app = super().admit(identity, host)
        reason = self.revocations.reason(app.name, identity, host)
        if reason is not None:
            raise AdmissionRejected(AdmissionCheck.REVOKED_BY_OPERATOR, reason)
        return app


# ----- stores -------------------------------------------------------------------------


class RevocationStore(Protocol):
    """Where revocations outlive the process. `load` raises RevocationStoreError if
    they cannot be read (the gateway then refuses to start: revoked enclaves must not
    come back); `save` raises it if they cannot be written."""

    def load(self) -> list[Revocation]: ...

    def save(self, revocations: Sequence[Revocation]) -> None: ...


class JsonFileRevocationStore:
    """One JSON document: ``{"schema": 1, "revocations": [...]}``."""

    def __init__(self, path: Path = DEFAULT_REVOCATIONS_FILE) -> None:
        self.path = path

    def load(self) -> list[Revocation]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise RevocationStoreError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            document = json.loads(text)
            if not isinstance(document, dict) or document.get("schema") != SCHEMA:
                raise ValueError(f"not a schema {SCHEMA} revocations document")
            return [Revocation.from_json(item) for item in document["revocations"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise RevocationStoreError(f"{self.path} is damaged: {exc}") from None

    def save(self, revocations: Sequence[Revocation]) -> None:
        document = {"schema": SCHEMA, "revocations": [r.to_json() for r in revocations]}
        data = (json.dumps(document, indent=1) + "\n").encode()
        try:
            write_atomically(self.path, data)
        except OSError as exc:
            raise RevocationStoreError(f"cannot write {self.path}: {exc}") from None


def write_atomically(path: Path, data: bytes, mode: int = 0o640) -> None:
    """Replace `path` with `data`: a crash leaves either the old file or the new one."""
    directory = path.parent
    directory.mkdir(mode=0o750, parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    # The rename itself reaches the disk only with the directory.
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def revocations_from(store: RevocationStore | None) -> Revocations:
    return Revocations(list(store.load()) if store is not None else [])
