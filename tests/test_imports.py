"""The import graph of the top-level packages points one way (docs/ARCHITECTURE.md, "Packages").

twin is the core and imports none of the others; compression and router import only twin; server imports
twin and router; zoo imports twin, compression and router; bench may import all of these and zoo; loadtest (an
HTTP client) imports only twin; cli, the `twinserve` composition root, may import anything. The allowed
arrows form a DAG, so there is no import circle. Every import counts, at module level or inside a function, absolute
or relative (a relative import that climbs out of its package is an error too).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("twin", "compression", "router", "server", "zoo", "bench", "loadtest", "cli")
ALLOWED = {
    "twin": set(),
    "compression": {"twin"},
    "router": {"twin"},
    "server": {"twin", "router"},
    "zoo": {"twin", "compression", "router"},
    "bench": {"twin", "compression", "router", "server", "zoo"},
    "loadtest": {"twin"},
    "cli": set(PACKAGES),
}
# (file, imported package) arrows that still break the rule, each with the reason it is not fixed yet.
# test_known_exceptions_still_exist fails once one is gone, so that it is removed from here too.
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()


def package_files(pkg: str) -> list[Path]:
    return sorted(p for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute dotted module) for every import statement of ``path``; relative imports resolved."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts[:-1])   # pkg/a/b.py and pkg/a/__init__.py: both in package pkg.a
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                out.append((node.lineno, node.module or ""))
                continue
            if node.level - 1 >= len(package):
                out.append((node.lineno, f"<relative import above {'.'.join(package)}>"))
                continue
            base = package[:len(package) - (node.level - 1)]
            out.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
    return sorted(out)


def arrows() -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) -> ["file:line module", ...], for imports across packages."""
    found: dict[tuple[str, str], list[str]] = {}
    for pkg in PACKAGES:
        for path in package_files(pkg):
            for line, module in imported_modules(path):
                top = module.split(".")[0]
                if top.startswith("<"):
                    top = module
                elif top not in PACKAGES or top == pkg:
                    continue
                found.setdefault((pkg, top), []).append(f"{path.relative_to(ROOT)}:{line} {module}")
    return found


def is_known(where: str, target: str) -> bool:
    return (where.split(":")[0], target) in KNOWN_EXCEPTIONS


def test_packages_exist():
    for pkg in PACKAGES:
        assert (ROOT / pkg / "__init__.py").is_file(), f"{pkg}/ is not a package"
        assert package_files(pkg)


def test_imports_point_down():
    bad = []
    for (src, dst), where in sorted(arrows().items()):
        if dst in ALLOWED[src]:
            continue
        bad.extend(f"{src} -> {dst}: {w}" for w in where if not is_known(w, dst))
    assert not bad, "imports against the layering (docs/ARCHITECTURE.md, Packages):\n" + "\n".join(bad)


def test_no_import_circle():
    """The packages' actual import graph is acyclic (a topological order exists), and so is the rule."""
    for graph in ({src: {dst for (s, dst) in arrows() if s == src} for src in PACKAGES}, ALLOWED):
        order, left = [], {p: (set(graph[p]) & set(PACKAGES)) - {p} for p in PACKAGES}
        while left:
            ready = [p for p, deps in left.items() if deps <= set(order)]
            assert ready, f"import circle among {sorted(left)}"
            order.extend(sorted(ready))
            for p in ready:
                del left[p]


def test_known_exceptions_still_exist():
    seen = {(w.split(":")[0], dst) for (_, dst), where in arrows().items() for w in where}
    stale = KNOWN_EXCEPTIONS - seen
    assert not stale, f"fixed, remove from KNOWN_EXCEPTIONS: {sorted(stale)}"


def test_relative_imports_resolve(tmp_path, monkeypatch):
    """The parser itself: relative imports resolve against the file's package, __init__ included."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "server" / "sub").mkdir(parents=True)
    f = tmp_path / "server" / "sub" / "mod.py"
    f.write_text("from . import a\nfrom ..app import b\nimport twin.artifact\n"
                 "def f():\n    from zoo import c\n")
    init = tmp_path / "server" / "__init__.py"
    init.write_text("from .app import x\nfrom .. import y\n")
    assert imported_modules(f) == [(1, "server.sub"), (2, "server.app"), (3, "twin.artifact"), (5, "zoo")]
    assert imported_modules(init) == [(1, "server.app"), (2, "<relative import above server>")]
