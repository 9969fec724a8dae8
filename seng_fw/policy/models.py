"""pydantic models of the YAML policy (`policies/*.yaml`)."""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv4Network
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

_HEX32 = re.compile(r"^[0-9a-f]{64}$")
NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,30}$"


def _measurement(value: object) -> bytes:
    """MRENCLAVE / MRSIGNER: 64 hex digits (case-insensitive, optional 0x) -> 32 bytes."""
    if not isinstance(value, str):
        raise ValueError("must be a string of 64 hex digits")
    text = value.strip().lower().removeprefix("0x")
    if not _HEX32.match(text):
        raise ValueError(f"must be 64 hex digits (32 bytes), got {value!r}")
    return bytes.fromhex(text)


def _one_or_many(value: object) -> object:
    return [value] if isinstance(value, str) else value


Measurement = Annotated[bytes, BeforeValidator(_measurement)]


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo in a security policy must not be ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class EnclaveSubnet(StrictModel):
    """A subnet enclave addresses are leased from; `gateway` is the gateway's own address
    on the TUN device (default: the first host address)."""

    subnet: IPv4Network
    gateway: IPv4Address | None = None

    @model_validator(mode="after")
    def _gateway_inside(self) -> EnclaveSubnet:
        if self.subnet.num_addresses < 4:
            raise ValueError(f"{self.subnet} is too small: use a /30 or larger")
        if self.gateway is None:
            object.__setattr__(self, "gateway", self.subnet.network_address + 1)
        elif self.gateway not in self.subnet or self.gateway in (
            self.subnet.network_address,
            self.subnet.broadcast_address,
        ):
            raise ValueError(f"gateway {self.gateway} is not a host address of {self.subnet}")
        return self

    @property
    def gateway_address(self) -> IPv4Address:
        assert self.gateway is not None  # set by the validator
        return self.gateway


DEFAULT_SHARED_SUBNET = EnclaveSubnet(subnet=IPv4Network("192.168.28.0/24"))


class App(StrictModel):
    name: str = Field(pattern=NAME_PATTERN)
    mrenclave: Annotated[list[Measurement], BeforeValidator(_one_or_many)] = Field(min_length=1)
    mrsigner: Measurement | None = None
    min_isv_svn: int = Field(default=0, ge=0, le=0xFFFF)
    isv_prod_id: int | None = Field(default=None, ge=0, le=0xFFFF)
    allow_debug: bool = False
    categories: list[str] = Field(default_factory=list)
    # Client-host subnets the app may run from (the DTLS peer's address).
    hosts: list[IPv4Network] = Field(min_length=1)
    # The app's own enclave subnet; without one, its enclaves share `shared_subnet`.
    subnet: EnclaveSubnet | None = None


class Policy(StrictModel):
    shared_subnet: EnclaveSubnet = DEFAULT_SHARED_SUBNET
    apps: list[App] = Field(default_factory=list)

    def subnet_of(self, app: App) -> EnclaveSubnet:
        return app.subnet or self.shared_subnet

    def enclave_subnets(self) -> list[EnclaveSubnet]:
        subnets = [self.shared_subnet]
        subnets += [app.subnet for app in self.apps if app.subnet is not None]
        return subnets


def cross_check(policy: Policy) -> list[tuple[tuple[str | int, ...], str]]:
    """Checks that span several apps; each problem comes with the path of the field at fault
    so the loader can name its file and line."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    names: dict[str, int] = {}
    claimed: dict[bytes, str] = {}
    subnets: list[tuple[IPv4Network, str]] = [(policy.shared_subnet.subnet, "shared_subnet")]
    for index, app in enumerate(policy.apps):
        if app.name in names:
            problems.append(
                (
                    ("apps", index, "name"),
                    f"duplicate app name {app.name!r} (also apps[{names[app.name]}])",
                )
            )
        names.setdefault(app.name, index)
        for m_index, measurement in enumerate(app.mrenclave):
            owner = claimed.setdefault(measurement, app.name)
            if owner != app.name:
                problems.append(
                    (
                        ("apps", index, "mrenclave", m_index),
                        f"MRENCLAVE {measurement.hex()} is already claimed by app {owner!r}",
                    )
                )
        if app.subnet is not None:
            for other, other_owner in subnets:
                if app.subnet.subnet.overlaps(other):
                    problems.append(
                        (
                            ("apps", index, "subnet", "subnet"),
                            f"{app.subnet.subnet} overlaps {other} of {other_owner}",
                        )
                    )
            subnets.append((app.subnet.subnet, f"app {app.name!r}"))
    return problems
