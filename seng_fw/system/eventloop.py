"""The event loop of the long-running data-path processes (gateway, enclave emulator).

uvloop (libuv, in C) where it is installed: each wakeup of the stdlib loop runs its
selector, key lookups, handle objects and timer heap in Python, 15-40 µs per wakeup on
this machine kind with cold caches (a ping through the tunnel wakes the gateway and the
emulator three to four times; bench/RESULTS-datapath.md, "Latency"). uvloop calls the
reader callbacks straight from its poll loop. `SENG_FW_EVENT_LOOP=asyncio` forces the
stdlib loop (e.g. to compare, or if uvloop misbehaves somewhere).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

ENV = "SENG_FW_EVENT_LOOP"


def loop_name() -> str:
    """ "uvloop" or "asyncio": what `run` uses in this process."""
    if os.environ.get(ENV, "").strip().lower() == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on the loop `loop_name` names."""
    if loop_name() == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
