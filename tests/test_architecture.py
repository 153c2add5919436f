"""The shape of the code, checked: imports point one way (no circles, no
layer reaching up), and no module uses another's underscored names (a seam
is a public name, or it is not a seam).

Read from the source with ``ast``, so a test of the tree needs no import of
it. A relative import, or one inside a function, counts as any other."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dmd"

# What each part may import of dmd (beyond itself). Longest prefix wins.
ALLOWED = {
    "dmd.engine": ("dmd.engine",),
    "dmd.state": ("dmd.state", "dmd.engine"),
    "dmd.service": ("dmd.service", "dmd.state", "dmd.engine"),
    "dmd.service.devices": ("dmd.service", "dmd.state", "dmd.engine"),
    "dmd.service.pools": ("dmd.service", "dmd.state", "dmd.engine"),
    "dmd.udev": ("dmd.udev", "dmd.service", "dmd.state", "dmd.engine"),
    "dmd.dbus": ("dmd.dbus", "dmd.service", "dmd.state", "dmd.engine"),
    "dmd.cli": ("dmd.cli", "dmd.dbus.names", "dmd.engine"),
    # a client of dmd's bus API and nothing else: its names are the contract
    "dmd.snapshotter": ("dmd.snapshotter", "dmd.dbus.names"),
}
# The core of the service layer is below both families; the device family
# is below the pool family (a pool is made of devices), never the reverse.
FORBIDDEN = {
    "dmd.service.devices": ("dmd.service.pools",),
}
# Other projects' underscored names, used knowingly (each file named, so that
# a use anywhere else fails the test): the man page walks argparse's parser
# (argparse has no public walk of its subcommands), and the bus sends through
# dbus-fast's own writer (to fail a send's future, not lose it, when the bus
# goes away; see DmdBus.send); protoc's generated module reads protobuf's.
KNOWN_CIRCLES: list[list[str]] = []
KNOWN_UPWARD: set[str] = set()
KNOWN_PRIVATE = {"dmd/manpage.py", "dmd/dbus/bus.py", "dmd/snapshotter/snapshots_pb2.py"}
CORE = ("dmd.service.errors", "dmd.service.auth", "dmd.service.locks", "dmd.service.kernel",
        "dmd.service.events", "dmd.service.journal", "dmd.service.jobs",
        "dmd.service.limits", "dmd.service.secrets")


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[int, str]]:
    """(line, module) for every dmd module *name* imports. ``from pkg import
    sub`` imports the submodule, not the package's own code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            if subs:
                yield from ((node.lineno, sub) for sub in subs)
            if len(subs) < len(node.names) and base in known:
                yield node.lineno, base


def test_no_import_circles() -> None:
    known = modules()
    graph = {m: {t for _, t in imports(m, p, known) if t != m} for m, p in known.items()}
    circles = []
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            part = []
            while True:
                top = stack.pop()
                part.append(top)
                if top == node:
                    break
            if len(part) > 1:
                circles.append(sorted(part))

    for node in graph:
        if node not in index:
            visit(node)
    assert sorted(circles) == KNOWN_CIRCLES


def _rule(name: str, table: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    keys = [k for k in table if name == k or name.startswith(k + ".")]
    return table[max(keys, key=len)] if keys else ()


def _under(target: str, prefixes: tuple[str, ...]) -> bool:
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def test_imports_point_down() -> None:
    known = modules()
    wrong = []
    for name, path in known.items():
        if name in ("dmd", "dmd.daemon", "dmd.__main__", "dmd.manpage"):
            continue  # the wiring: it may import every part
        allowed, forbidden = _rule(name, ALLOWED), _rule(name, FORBIDDEN)
        if name in CORE:
            allowed = (*CORE, "dmd.service", "dmd.state", "dmd.engine")
        for _line, target in imports(name, path, known):
            if target == "dmd" or _under(target, (name,)):
                continue
            if not _under(target, allowed) or _under(target, forbidden):
                wrong.append(f"{path.relative_to(ROOT)} imports {target}")
    assert set(wrong) == KNOWN_UPWARD


def _own_names(tree: ast.Module) -> set[str]:
    """Every name a module defines: its functions, classes and their
    members, and the attributes its code assigns."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_uses_another_modules_underscored_names() -> None:
    wrong = []
    for path in sorted(list(PACKAGE.rglob("*.py")) + list((ROOT / "bench").rglob("*.py"))):
        tree = ast.parse(path.read_text())
        own = _own_names(tree)
        where = path.relative_to(ROOT)
        if str(where) in KNOWN_PRIVATE:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                wrong += [f"{where}:{node.lineno} imports {node.module}.{a.name}"
                          for a in node.names if _private(a.name)]
            elif isinstance(node, ast.Attribute) and _private(node.attr) and \
                    node.attr not in own:
                wrong.append(f"{where}:{node.lineno} uses {ast.unparse(node)}")
    assert wrong == []


def test_the_checks_see_what_they_look_for(tmp_path: Path) -> None:
    """The underscore check flags a use of another module's name and
    passes one of the module's own."""
    tree = ast.parse("import x\nclass A:\n    def f(self):\n        self._mine = 1\n"
                     "        return x._theirs, self._mine, other._mine\n")
    own = _own_names(tree)
    used = [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and _private(n.attr) and n.attr not in own]
    assert used == ["_theirs"]
    assert _rule("dmd.service.pools.cache", ALLOWED) == ALLOWED["dmd.service.pools"]
    assert _under("dmd.service.pools.service", FORBIDDEN["dmd.service.devices"])
