"""The architecture, checked: imports point down, no cycles, small files (issue 21).

The contracts live in pyproject.toml ([tool.importlinter]); `lint-imports` checks them on grimp's graph of
every import, including those inside functions. These tests run it, prove that it fails on an upward
import, and add what import-linter does not say itself: no import cycle between any two modules, and no
module over 600 lines.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The package-dir mapping of pyproject.toml: import name -> folder.
PACKAGES = {"kdpipe.storage": "storage", "kdpipe.pipeline": "pipeline", "kdpipe.jobs": "jobs", "kdpipe.slurm": "slurm"}
MAX_LINES = 600


def _lint_imports(cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(exe), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_lint_imports_passes():
    proc = _lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def _copy_tree(dst: Path) -> Path:
    """The project's Python sources under dst/kdpipe/<name> (a namespace package, like the install), with
    pyproject.toml beside them; returns the folder to put on PYTHONPATH."""
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    for name, folder in PACKAGES.items():
        shutil.copytree(ROOT / folder, dst / "kdpipe" / name.split(".")[1],
                        ignore=shutil.ignore_patterns("__pycache__", "*.gz", "*.jsonl", "*.toml", "*.sbatch", "*.md"))
    return dst


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # The store reaching up into the pipeline, from inside a function (grimp must see those too).
        ("storage/format.py", "def _upward():\n    from kdpipe.pipeline.config import load_config\n",
         "The store knows nothing"),
        # A phase importing another phase.
        ("pipeline/train/data.py", "from kdpipe.pipeline.evaluate import config as _c\n", "The phases never import each other"),
        # A job module importing the command line.
        ("jobs/render.py", "def _upward():\n    import kdpipe.pipeline.cli\n", "Imports point down"),
    ],
)
def test_lint_imports_fails_on_an_upward_import(tmp_path, module, line, broken):
    root = _copy_tree(tmp_path)
    folder, rest = module.split("/", 1)
    target = root / "kdpipe" / folder / rest
    target.write_text(target.read_text() + "\n\n" + line)
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = _lint_imports(root, env)
    assert proc.returncode != 0, proc.stdout[-4000:]
    assert f"{broken}" in proc.stdout and "BROKEN" in proc.stdout, proc.stdout[-4000:]
    # The copy itself (without the added line) is what the first test checks: the failure is the new import.


def test_lint_imports_checks_the_copy_it_was_given(tmp_path):
    """The copy used above passes unchanged, so the failures there come from the added import alone."""
    root = _copy_tree(tmp_path)
    proc = _lint_imports(root, dict(os.environ, PYTHONPATH=str(root)))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_no_module_over_600_lines():
    long = []
    for folder in ("pipeline", "storage", "jobs"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            n = len(path.read_text().splitlines())
            if n > MAX_LINES:
                long.append(f"{path.relative_to(ROOT)}: {n} lines")
    assert not long, "split by concept (STYLE.md: files under ~600 lines): " + "; ".join(long)


def _cycles(succ: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(succ):
        if root in index:
            continue
        work = [(root, iter(sorted(succ[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(succ[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_modules():
    import grimp

    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    succ = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    # grimp sees imports inside functions (cli imports kdpipe.pipeline.config only inside option_help).
    assert "kdpipe.pipeline.config" in graph.find_modules_directly_imported_by("kdpipe.pipeline.cli")
    assert _cycles(succ) == [], "import cycles (break each by moving the shared part down)"


def test_every_pipeline_module_has_a_layer():
    """A new module under pipeline/ must be placed in the layers contract, or lint-imports would not check it."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["id"] == "layers")["layers"]
    named = {m.strip() for layer in layers for part in layer.split("|") for m in part.split(":")}
    children = {f"kdpipe.pipeline.{p.stem}" for p in (ROOT / "pipeline").glob("*.py") if p.stem != "__init__"}
    children |= {f"kdpipe.pipeline.{p.name}" for p in (ROOT / "pipeline").iterdir() if (p / "__init__.py").is_file()}
    assert children <= named, f"not in [tool.importlinter] layers: {sorted(children - named)}"
