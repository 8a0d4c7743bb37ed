"""The package's shape: building flows one way (no import cycle in src/, imports inside
functions and under TYPE_CHECKING counted), every public name of the previous release still
imports, and the module paths that moved answer with the module at the new path."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PUBLIC_NAMES = Path(__file__).with_name("data") / "public_names.txt"

# Edges that close a cycle on purpose, each with the release that removes it.
ALLOWED = {
    ("guardprob.spec", "guardprob.classifier"): "ClassifierSpec.build(), deprecated for Classifier.from_spec(spec)",
}


def modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imported(module: str, path: Path, node: ast.Import | ast.ImportFrom, known: dict[str, Path]) -> list[str]:
    """The modules of src/ that one import statement loads, most specific first: ``from pkg import
    sub`` is an edge to pkg.sub, ``from pkg import name`` one to pkg."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            package = package[: len(package) - node.level + 1]
            prefix = ".".join(package + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        subs = [f"{prefix}.{alias.name}" for alias in node.names if f"{prefix}.{alias.name}" in known]
        names = subs + ([prefix] if len(subs) < len(node.names) else [])
    out = []
    for name in names:
        while name and name not in known:  # `import a.b.c` of an attribute path: its module
            name = name.rpartition(".")[0]
        if name and name != module:
            out.append(name)
    return out


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for module, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):  # every level, TYPE_CHECKING too
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[module].update(imported(module, path, node, known))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    for a, b in ALLOWED:
        graph[a].discard(b)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_every_allowed_edge_is_still_there():
    graph = import_graph()
    gone = [edge for edge in ALLOWED if edge[1] not in graph[edge[0]]]
    assert not gone, f"drop these from ALLOWED, they no longer exist: {gone}"


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    # a function-level import counts: this is the edge that made building run in a circle
    tree = ast.parse("def build():\n    from guardprob.classifier import Classifier\n")
    known = {"guardprob.classifier": Path("classifier.py"), "guardprob.spec": Path("spec.py")}
    edges = [e for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
             for e in imported("guardprob.spec", Path("spec.py"), node, known)]
    assert edges == ["guardprob.classifier"]


def public_names() -> list[tuple[str, list[str]]]:
    rows = []
    for line in PUBLIC_NAMES.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            module, _, names = line.partition(":")
            rows.append((module.strip(), names.split()))
    return rows


@pytest.mark.slow  # imports every optional integration (LiteLLM alone takes seconds)
def test_every_public_name_of_the_previous_release_still_imports():
    # In a fresh interpreter, so that the moved paths are imported (and warn) for the first time here.
    script = (
        "import importlib, sys, warnings\n"
        "warnings.simplefilter('ignore', DeprecationWarning)\n"
        f"rows = {public_names()!r}\n"
        "missing = []\n"
        "for module, names in rows:\n"
        "    try:\n"
        "        m = importlib.import_module(module)\n"
        "    except ImportError as exc:\n"
        "        missing.append(f'{module} ({exc})'); continue\n"
        "    missing += [f'{module}.{n}' for n in names if not hasattr(m, n)]\n"
        "print('\\n'.join(missing)); sys.exit(1 if missing else 0)\n"
    )
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}  # LiteLLM's import asks the network otherwise
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, f"no longer importable:\n{done.stdout}{done.stderr[-2000:]}"
    assert sum(len(names) for _, names in public_names()) > 400  # the list itself is whole


def test_a_moved_path_is_the_module_at_its_new_path_and_warns():
    script = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import guardprob.search as old\n"
        "    from guardprob.reader import read_request\n"
        "import guardprob.core.search as new, guardprob.inputs.reader as reader\n"
        "assert old is new and read_request is reader.read_request, (old, new)\n"
        "assert old.__spec__.name == 'guardprob.core.search', old.__spec__.name\n"
        "moved = [str(w.message) for w in caught if w.category is DeprecationWarning]\n"
        "assert any('guardprob.search moved to guardprob.core.search' in m for m in moved), moved\n"
        "assert any('guardprob.reader moved to guardprob.inputs.reader' in m for m in moved), moved\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_old_bench_module_names_forward_with_a_warning():
    import guardprob.bench
    from guardprob.bench import compare

    with pytest.warns(DeprecationWarning, match="guardprob.bench.compare.Recorder"):
        assert guardprob.bench.Recorder is compare.Recorder
    with pytest.raises(AttributeError):
        guardprob.bench.no_such_name  # noqa: B018


def test_the_package_root_is_the_public_api_and_the_layers():
    """The root holds the public API and the subpackages; the maths lives in core/."""
    root = sorted(p.stem for p in (SRC / "guardprob").glob("*.py"))
    assert root == ["__init__", "_moved", "classifier", "cli", "deprecations", "errors", "models", "result", "spec",
                    "taxonomy"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import guardprob
        from guardprob import Classifier, Scores  # noqa: F401

        assert set(guardprob.__all__) <= set(dir(guardprob)) | {"Classifier"}


def test_no_test_module_imports_another():
    """Shared set-ups live in helper modules (helpers.py, oracle.py, format_oracle.py, ...), so
    that running one test module never collects or runs another's tests."""
    tests = Path(__file__).resolve().parent
    offenders = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{path.name} imports {n}" for n in names if n.split(".")[0].startswith("test_")]
    assert not offenders, offenders
