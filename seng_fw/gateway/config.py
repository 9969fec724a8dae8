"""The gateway configuration file (`gateway.yaml`). Relative paths in it are taken
relative to the file's own directory, so a lab or /etc/seng-fw tree can be moved whole."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from seng_fw.gateway.limits import LimitsConfig
from seng_fw.label.config import LabelConfig
from seng_fw.policy.models import Policy, StrictModel
from seng_fw.policy.yamlfile import PATTERN_WORDS, load_model

# Defined with the IPC, below the layers that need it (`seng-fw apply` talks to it too).
from seng_fw.system.ipc import DEFAULT_CONTROL_SOCKET as DEFAULT_CONTROL_SOCKET

QUOTE_STATUSES = (
    "OK",
    "GROUP_OUT_OF_DATE",
    "CONFIGURATION_NEEDED",
    "SW_HARDENING_NEEDED",
    "CONFIGURATION_AND_SW_HARDENING_NEEDED",
)


# DCAP TCB statuses that may be allowed (Revoked never is).
DCAP_TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
)


class DcapAttestationConfig(StrictModel):
    # Intel SGX Root CA (or a lab root): the DCAP trust anchors, PEM.
    roots: list[Path] = Field(min_length=1)
    # Collateral bundles (QuoteCollateralV3 JSON), or directories of *.json bundles.
    collateral: list[Path] = Field(min_length=1)
    allow_status: list[str] = Field(default_factory=lambda: ["UpToDate"])

    @field_validator("allow_status")
    @classmethod
    def _known_status(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(DCAP_TCB_STATUSES))
        if unknown:
            raise ValueError(f"unknown TCB status {unknown}; known: {list(DCAP_TCB_STATUSES)}")
        return value


class ListenConfig(StrictModel):
    address: IPv4Address = IPv4Address("127.0.0.1")
    # Tunnel #1 listens on `port`, tunnel #2 on `port + 1` (SENG protocol).
    port: int = Field(default=12345, ge=1, le=65534)


class TlsConfig(StrictModel):
    certificate: Path
    key: Path


class AttestationConfig(StrictModel):
    roots: list[Path] = Field(min_length=1)
    allow_status: list[str] = Field(default_factory=lambda: ["OK"])
    # SENG clients obtain their report when the enclave starts; a report older than this
    # is refused. None disables the check (not recommended).
    max_report_age: float | None = Field(default=86400.0, gt=0)
    # DCAP (ECDSA) evidence is admitted only when configured.
    dcap: DcapAttestationConfig | None = None
    # DCAP platforms affected by these advisories are refused (e.g. INTEL-SA-00615).
    refuse_advisories: list[str] = Field(default_factory=list)

    @field_validator("allow_status")
    @classmethod
    def _known_status(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(QUOTE_STATUSES))
        if unknown:
            raise ValueError(f"unknown quote status {unknown}; known: {list(QUOTE_STATUSES)}")
        return value


class TunConfig(StrictModel):
    name: str = Field(default="tunFA", pattern=r"^[A-Za-z0-9_.-]{1,15}$")
    mtu: int = Field(default=1432, ge=576, le=9000)
    # Virtio-net header and TCP segmentation offload (seng_fw/tunnel/tun.py); off only
    # to compare, or for a kernel that misbehaves with it.
    offload: bool = True
    # With it: an enclave's in-order TCP segments written to the TUN device as one
    # super-packet (seng_fw/tunnel/offload.py, coalesce_tcp4).
    coalesce: bool = True


class TimeoutConfig(StrictModel):
    idle: float = Field(default=600.0, gt=0)
    pairing: float = Field(default=30.0, gt=0)
    assignment_resend: float = Field(default=1.0, gt=0)
    assignment_attempts: int = Field(default=8, ge=1)


GROUP_PATTERN = r"^[a-z_][a-z0-9_-]*\$?$"
PATTERN_WORDS[GROUP_PATTERN] = "a group name is lower-case letters, digits, '_' and '-'"


class ControlConfig(StrictModel):
    """The local control socket of `seng-fw status | enclaves | revoke | reload`."""

    socket: Path = DEFAULT_CONTROL_SOCKET
    # Write it in octal (YAML `0660`, or the string "0o660"). Connecting needs write
    # permission, so the owner (the gateway's user) and `group` may talk to it, and root.
    mode: int = 0o660
    # Group that may use the socket; null: the gateway's own group.
    group: str | None = Field(default=None, pattern=GROUP_PATTERN)

    @field_validator("mode", mode="before")
    @classmethod
    def _octal_text(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip().lower().removeprefix("0o")
            try:
                return int(text, 8)
            except ValueError:
                raise ValueError(f"not an octal mode: {value!r}") from None
        return value

    @field_validator("mode")
    @classmethod
    def _private(cls, mode: int) -> int:
        if not 0 <= mode <= 0o777:
            raise ValueError(f"{mode} is not a permission mode (write it in octal, e.g. 0660)")
        if mode & 0o007:
            raise ValueError(f"{mode:#o} lets every local user in; use 0660 or 0600")
        return mode

    @model_validator(mode="after")
    def _group_can_connect(self) -> ControlConfig:
        if self.group is not None and not self.mode & 0o020:
            raise ValueError(f"mode {self.mode:#o} gives group {self.group!r} no write access")
        return self


class MetricsConfig(StrictModel):
    # "ADDRESS:PORT" for the Prometheus endpoint (GET /metrics); null: no metrics.
    listen: str | None = None

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            parse_host_port(value)
        return value

    @property
    def address(self) -> tuple[str, int] | None:
        return None if self.listen is None else parse_host_port(self.listen)


def parse_host_port(text: str, example: str = "127.0.0.1:9108") -> tuple[str, int]:
    """ "127.0.0.1:9108" -> ("127.0.0.1", 9108); IPv4 only, like the rest of the gateway.
    `example` is what the error shows (the metrics port unless the caller says)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"expected ADDRESS:PORT, e.g. {example}, got {text!r}")
    try:
        IPv4Address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IPv4 address") from None
    return host, int(port)


class StateConfig(StrictModel):
    """What the gateway keeps across restarts (systemd's StateDirectory=)."""

    # Operator revocations (`seng-fw revoke`), with who, when and why.
    revocations: Path = Path("/var/lib/seng-fw/revocations.json")


class GatewayConfig(StrictModel):
    listen: ListenConfig = ListenConfig()
    tls: TlsConfig
    attestation: AttestationConfig
    tun: TunConfig = TunConfig()
    timeouts: TimeoutConfig = TimeoutConfig()
    limits: LimitsConfig = LimitsConfig()
    # A policy file (apps, subnets), or a directory of *.yaml parts.
    policy: Path
    # per_app: every app has its own enclave subnet (told apart by address);
    # shared: apps share one subnet and the labeller marks their connections.
    mode: Literal["per_app", "shared"] = "per_app"
    label: LabelConfig = LabelConfig()
    control: ControlConfig = ControlConfig()
    metrics: MetricsConfig = MetricsConfig()
    state: StateConfig = StateConfig()
    # text: "LEVEL logger: message"; json: one JSON object per line. One event per line.
    log_format: Literal["text", "json"] = "text"

    def resolved(self, base: Path) -> GatewayConfig:
        """The same configuration with relative paths made absolute against `base`."""

        def fix(path: Path) -> Path:
            return path if path.is_absolute() else (base / path).resolve()

        return self.model_copy(
            update={
                "tls": TlsConfig(certificate=fix(self.tls.certificate), key=fix(self.tls.key)),
                "attestation": self.attestation.model_copy(
                    update={
                        "roots": [fix(root) for root in self.attestation.roots],
                        "dcap": None
                        if self.attestation.dcap is None
                        else self.attestation.dcap.model_copy(
                            update={
                                "roots": [fix(p) for p in self.attestation.dcap.roots],
                                "collateral": [fix(p) for p in self.attestation.dcap.collateral],
                            }
                        ),
                    }
                ),
                "policy": fix(self.policy),
                "control": self.control.model_copy(update={"socket": fix(self.control.socket)}),
                "label": self.label.model_copy(update={"socket": fix(self.label.socket)}),
                "state": StateConfig(revocations=fix(self.state.revocations)),
            }
        )


def load_gateway_config(path: Path) -> GatewayConfig:
    """Raises seng_fw.policy.yamlfile.ConfigError naming file, line and field."""
    return load_model(path, GatewayConfig).resolved(path.parent)


def shared_subnet_apps(policy: Policy) -> list[str]:
    """Apps without a subnet of their own: their enclaves share `shared_subnet`."""
    return [app.name for app in policy.apps if app.subnet is None]


def mode_problem(mode: str, policy: Policy) -> str | None:
    """Why the gateway cannot run `policy` in `mode`, if it cannot. Under per_app, no
    labeller marks the shared subnet's connections and the ruleset drops them all: such
    enclaves would be admitted, leased an address and then silently cut off."""
    shared = shared_subnet_apps(policy)
    if mode == "shared" or not shared:
        return None
    many = len(shared) > 1
    return (
        f"mode per_app, but app{'s' if many else ''} {', '.join(shared)} "
        f"{'have' if many else 'has'} no subnet of {'their' if many else 'its'} own: "
        f"{'their' if many else 'its'} enclaves would lease addresses of the shared subnet "
        f"{policy.shared_subnet.subnet} and have all their traffic dropped (only the "
        "labeller of mode shared passes it); set `mode: shared` in the gateway "
        f"configuration or give {'each of them' if many else 'it'} a `subnet:`"
    )
