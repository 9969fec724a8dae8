"""The package's shape: no import cycle between modules or between packages, no module
loose at the top of `seng_fw` but the entry points, and no test or lab code imported by
the product's runtime packages."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import seng_fw

PACKAGE_ROOT = Path(seng_fw.__file__).parent
# The only modules allowed at the top: the package marker and the command-line entry points.
TOP_LEVEL_MODULES = {"__init__", "__main__", "cli"}
# Runtime packages a gateway runs; none of them may depend on the lab or on tests.
RUNTIME_PACKAGES = {"attest", "compile", "gateway", "label", "ops", "policy", "system", "tunnel"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE_ROOT.rglob("*.py"))}


def _imports(path: Path, known: set[str]) -> Iterator[str]:
    """Modules of `known` imported by `path` at run time (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(), str(path))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in known:
                    yield full
                elif node.module in known:
                    yield node.module


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: set(_imports(path, known)) - {name} for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _package_of(module: str) -> str:
    """`gateway` for seng_fw.gateway.core; "" for the top-level entry points."""
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and parts[1] not in TOP_LEVEL_MODULES):
        return parts[1]
    return ""


def test_no_module_import_cycle() -> None:
    assert _find_cycle(_graph()) is None


def test_no_package_import_cycle() -> None:
    packages: dict[str, set[str]] = {}
    for module, deps in _graph().items():
        source = _package_of(module)
        if not source:
            continue  # the entry points import everything
        targets = {_package_of(dep) for dep in deps} - {source, ""}
        packages.setdefault(source, set()).update(targets)
    assert _find_cycle(packages) is None


def test_no_loose_modules_at_the_top() -> None:
    loose = {p.stem for p in PACKAGE_ROOT.glob("*.py")} - TOP_LEVEL_MODULES
    assert not loose, f"modules outside a package: {sorted(loose)}"


def test_runtime_packages_do_not_import_the_lab_or_tests() -> None:
    offenders = [
        f"{module} imports {dep}"
        for module, deps in _graph().items()
        if _package_of(module) in RUNTIME_PACKAGES
        for dep in deps
        if _package_of(dep) == "lab"
    ]
    assert not offenders
    for path in PACKAGE_ROOT.rglob("*.py"):
        assert "from tests" not in path.read_text(), f"{path} imports test code"


def test_the_cycle_finder_finds_cycles() -> None:
    """The checks above can fail: a cycle in a made-up graph is found."""
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


# The README's layers: a package imports only from its own layer and those below.
LAYERS = {
    "system": 0,
    "attest": 1, "policy": 1, "tunnel": 1,
    "compile": 2, "label": 2,
    "gateway": 3,
    "ops": 4,
    "lab": 5,
}  # fmt: skip


def test_packages_import_only_from_their_layer_and_below() -> None:
    offenders = [
        f"{module} imports {dep}"
        for module, deps in _graph().items()
        if _package_of(module) in LAYERS
        for dep in deps
        if LAYERS.get(_package_of(dep), -1) > LAYERS[_package_of(module)]
    ]
    assert not offenders


def test_private_python_mbedtls_state_is_reached_only_through_the_native_bridge() -> None:
    """`_handshake_state` and `_reset()` are python-mbedtls internals: one module
    (tunnel/dtls_native.py) touches them, so an upgrade has one place to check."""
    bridge = PACKAGE_ROOT / "tunnel" / "dtls_native.py"
    for path in PACKAGE_ROOT.rglob("*.py"):
        text = path.read_text()
        if path != bridge:
            assert "._handshake_state" not in text and "._reset()" not in text, path
