"""Imports point down: the package graph has no cycle, and matches the table in docs/design.md.

Every ``import`` of a megatron_spin module anywhere in a package's files (function-local ones
included) is an edge from that package to the imported one.  The design page lists, per
package, what it may import; an edge the page does not allow fails here, so the page cannot
drift from the code.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import megatron_spin

PACKAGE = Path(megatron_spin.__file__).parent
DESIGN = PACKAGE.parent / "docs" / "design.md"


def package_edges(root: Path = PACKAGE) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).parts
        if rel == ("__init__.py",):
            continue
        src = rel[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron_spin"):
                names = ([f"megatron_spin.{a.name}" for a in node.names] if node.module == "megatron_spin"
                         else [node.module])
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("megatron_spin.")]
            for name in names:
                target = name.split(".")[1]
                if target != src:
                    edges[src].add(target)
    return edges


def allowed_from_design() -> dict[str, set[str]]:
    rows = {}
    for line in DESIGN.read_text().splitlines():
        m = re.match(r"^\| `(\w+)` \| (.*?) \| .* \|$", line)
        if m:
            rows[m.group(1)] = set(re.findall(r"`(\w+)`", m.group(2)))
    return rows


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every package that can reach itself, with one path back."""
    found = []
    for start in sorted(edges):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(edges.get(node, ())):
                if nxt == start:
                    found.append(path + [start])
                    stack = []
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    return found


def test_no_package_imports_one_that_imports_it_back():
    assert cycles(package_edges()) == []


def test_every_import_is_one_the_design_page_allows():
    allowed = allowed_from_design()
    edges = package_edges()
    packages = {p.name.removesuffix(".py") for p in PACKAGE.iterdir()
                if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.name != "__init__.py")}
    assert packages - set(allowed) == set(), "packages missing from docs/design.md's table"
    extra = {src: sorted(targets - allowed[src]) for src, targets in edges.items() if targets - allowed[src]}
    assert not extra, f"imports docs/design.md does not allow (fix the import, or the page): {extra}"


def test_the_cycle_finder_finds_a_three_package_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"], ["b", "c", "a", "b"],
                                                                        ["c", "a", "b", "c"]]


def test_an_engine_host_process_does_not_load_torch():
    """Ray's engine-host actor imports ``orchestrate.engines``, unpickles its rollout section and
    EngineLaunch, and calls the launcher, which reads ``platform.cpu_worker_env``: none of that may
    pull in torch (it made each host ~270 MB PSS instead of ~85).  The whole run config is read
    without torch too (the driver validates it before anything heavy starts)."""
    import subprocess
    import sys

    code = """
import pickle, sys
from megatron_spin.orchestrate.engines import EngineHost, EngineLaunch, reachable_url
from megatron_spin.config.run import RolloutConfig, RunConfig
from megatron_spin.platform import cpu_worker_env
from megatron_spin.rollout.launcher import launch_embedded
launch = pickle.loads(pickle.dumps(EngineLaunch("/m", threads=2)))
rollout = pickle.loads(pickle.dumps(RolloutConfig(n=3)))
assert launch.threads == 2 and rollout.n == 3 and cpu_worker_env({})
heavy = sorted(m for m in ("torch", "numpy", "transformers", "megatron") if m in sys.modules)
print(heavy)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout
