"""The gateway configuration file (`gateway.yaml`). Relative paths in it are taken
relative to the file's own directory, so a lab or /etc/seng-fw tree can be moved whole."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

from pydantic import Field, field_validator

from seng_fw.policy.models import StrictModel
from seng_fw.yamlfile import load_model

QUOTE_STATUSES = (
    "OK",
    "GROUP_OUT_OF_DATE",
    "CONFIGURATION_NEEDED",
    "SW_HARDENING_NEEDED",
    "CONFIGURATION_AND_SW_HARDENING_NEEDED",
)


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


class TimeoutConfig(StrictModel):
    idle: float = Field(default=600.0, gt=0)
    pairing: float = Field(default=30.0, gt=0)
    assignment_resend: float = Field(default=1.0, gt=0)
    assignment_attempts: int = Field(default=8, ge=1)


class GatewayConfig(StrictModel):
    listen: ListenConfig = ListenConfig()
    tls: TlsConfig
    attestation: AttestationConfig
    tun: TunConfig = TunConfig()
    timeouts: TimeoutConfig = TimeoutConfig()
    # A policy file (apps, subnets).
    policy: Path

    def resolved(self, base: Path) -> GatewayConfig:
        """The same configuration with relative paths made absolute against `base`."""

        def fix(path: Path) -> Path:
            return path if path.is_absolute() else (base / path).resolve()

        return self.model_copy(
            update={
                "tls": TlsConfig(certificate=fix(self.tls.certificate), key=fix(self.tls.key)),
                "attestation": self.attestation.model_copy(
                    update={"roots": [fix(root) for root in self.attestation.roots]}
                ),
                "policy": fix(self.policy),
            }
        )


def load_gateway_config(path: Path) -> GatewayConfig:
    """Raises seng_fw.yamlfile.ConfigError naming file, line and field."""
    return load_model(path, GatewayConfig).resolved(path.parent)
