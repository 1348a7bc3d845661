"""The package's shape: imports point one way (no cycle, function-level imports included),
the loop and the CLI are imported by nobody below them, and the entry points import cleanly."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jaxft"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the jaxft modules it imports anywhere in its body (parent packages of a
    submodule import excluded: `import jaxft.a.b` runs jaxft.a's __init__, not a cycle of ours)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "jaxft.run" in graph and "jaxft.tasks.dpo" in graph
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_arrows_point_down():
    # cli -> sweep -> run -> tasks -> steps -> losses / models, with data, parallel and io below:
    # the loop is wired by the run alone (the CLI and a sweep's runner catch its Preempted),
    # nobody imports the CLI, nothing below the run knows it or the loop, and the losses know
    # nothing but each other.
    graph = import_graph()
    below_run = ("jaxft.tasks", "jaxft.steps", "jaxft.losses", "jaxft.models", "jaxft.parallel",
                 "jaxft.data", "jaxft.io", "jaxft.eval", "jaxft.inference")
    for name, edges in graph.items():
        in_cli = name == "jaxft.cli" or name.startswith("jaxft.cli.")
        assert in_cli or not any(e == "jaxft.cli" or e.startswith("jaxft.cli.") for e in edges), name
        if "jaxft.loop" in edges:
            assert in_cli or name in ("jaxft.run", "jaxft.sweep.runner"), name
        if name.startswith(below_run):
            assert not any(e.startswith(("jaxft.run", "jaxft.loop", "jaxft.quickstart")) for e in edges), name
        if name.startswith(("jaxft.steps", "jaxft.losses", "jaxft.models", "jaxft.parallel")):
            assert not any(e.startswith(("jaxft.tasks", "jaxft.eval")) for e in edges), name
        if name.startswith("jaxft.losses"):
            # jaxft.errors, the UserError family, is the ground floor: it imports nothing.
            assert edges <= {"jaxft.losses.token", "jaxft.losses.preference", "jaxft.losses.chunked",
                             "jaxft.losses.chunk_plan", "jaxft.losses.vocab_parallel", "jaxft.losses.router",
                             "jaxft.errors"}, name
        if name == "jaxft.errors":
            assert not edges, name


def test_entry_points_import_in_a_fresh_interpreter():
    code = "import jaxft.run, jaxft.tasks, jaxft.cli; print(sorted(jaxft.tasks.TASKS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['dpo', 'sft']"

