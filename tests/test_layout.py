"""The package's one layout rule, read from the source: imports point down, never sideways between the two features,
and no module imports itself back through another.

    cli, evaluation        (top: the command line; fixtures the library never imports)
    backdoor, lineage      (the two features; neither imports the other)
    io, distributed, info  (files, process groups, diagnostics)
    ops                    (the kernel layer)
    reference              (float64 oracles)
    _backend, stats, _version
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tensorguard_fast"
LEVELS = {"_version": 0, "_backend": 0, "stats": 0, "_C": -1, "reference": 1, "ops": 2,
          "io": 3, "distributed": 3, "info": 3, "backdoor": 4, "lineage": 4, "cli": 5, "evaluation": 5}


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """Every tensorguard_fast module `path` imports (module level and inside functions), resolved to absolute."""
    this = _module(path)
    package = this if path.name == "__init__.py" else this.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("tensorguard_fast"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("tensorguard_fast"):
                continue
            yield from (f"{target}.{a.name}" for a in node.names)  # "from .x import y": y may be a module


def _known(name: str, modules) -> str:
    """The longest prefix of `name` that is a module of the package (an imported name is not a module)."""
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _graph():
    files = [p for p in PACKAGE.rglob("*.py")]
    modules = {_module(p) for p in files} | {"tensorguard_fast._C"}  # the compiled extension
    return {_module(p): {_known(t, modules) for t in _imports(p)} - {_module(p)} for p in files}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_imports_point_down():
    wrong = []
    for src, targets in _graph().items():
        if src == "tensorguard_fast":
            continue  # the package root exports names lazily, by string
        for dst in targets:
            a, b = _part(src), _part(dst)
            if dst == "tensorguard_fast" or a == b:
                if dst == "tensorguard_fast":
                    wrong.append(f"{src} -> the package root (import from the module that defines the name)")
                continue
            if LEVELS[b] >= LEVELS[a]:
                wrong.append(f"{src} -> {dst}")
    assert not wrong, "imports that do not point down:\n" + "\n".join(sorted(wrong))


def test_every_part_has_a_level():
    assert {_part(m) for m in _graph() if m != "tensorguard_fast"} <= set(LEVELS)


def test_no_import_cycle():
    graph = _graph()
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state and node != "tensorguard_fast":
            visit(node)


def test_the_rule_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: an ops module importing a feature is reported."""
    pkg = tmp_path / "tensorguard_fast"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "backdoor").mkdir()
    for f in ("__init__.py", "ops/__init__.py", "backdoor/__init__.py", "backdoor/scan.py"):
        (pkg / f).write_text("")
    (pkg / "ops" / "bad.py").write_text("from ..backdoor import scan\n")
    monkeypatch.setitem(globals(), "PACKAGE", pkg)
    try:
        test_imports_point_down()
    except AssertionError as exc:
        assert "tensorguard_fast.ops.bad -> tensorguard_fast.backdoor.scan" in str(exc)
    else:
        raise AssertionError("an upward import went unnoticed")
