"""Lineage DVC can see: every `pipeline/` module a stage runs is one of that stage's `deps` in dvc.yaml.

A stage's code is the import closure of its script `stages/<name>.py` inside `pipeline/`, found statically: every
`import` and `from ... import` node anywhere in a module (lazy, function-level imports too), followed through
`pipeline.*` modules transitively. The register stage also logs the pyfunc model (`pipeline/pyfunc.py`), whose code
runs at serving time; its closure is part of what the registered version depends on.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "pipeline"
# Code a stage runs besides its script's imports: the register stage's pyfunc is loaded by MLflow from its file.
EXTRA_ROOTS = {"register": ["pipeline/pyfunc.py"]}


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """`pipeline.a.b` -> pipeline/a/b.py or pipeline/a/b/__init__.py (None when neither exists)."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def package_of(path: Path, root: Path) -> str:
    """pipeline/a.py and pipeline/__init__.py are both in package `pipeline`."""
    return ".".join(path.relative_to(root).parts[:-1])


def imported_names(path: Path, root: Path = ROOT) -> set[str]:
    """Every module name the file imports, at any depth of its syntax tree; `from X import y` names both X and X.y
    (y may be a submodule). Relative imports are resolved against the file's package."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = package_of(path, root).split(".")
                package = package[: len(package) - node.level + 1]
                base = ".".join(filter(None, [*package, base]))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def has_code(path: Path) -> bool:
    """False for a module that is only a docstring (such a package __init__ runs nothing worth a dep)."""
    body = ast.parse(path.read_text()).body
    return any(not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)) for s in body)


def closure(roots: list[Path], root: Path = ROOT) -> set[Path]:
    """The files under `pipeline/` that running `roots` imports, transitively (packages' __init__ included when they
    hold code), plus the roots themselves."""
    seen, todo = set(), list(roots)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_names(path, root):
            if name != PACKAGE and not name.startswith(PACKAGE + "."):
                continue
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, then c
                found = module_file(".".join(parts[:i]), root)
                if found is not None and (found.name != "__init__.py" or has_code(found)):
                    todo.append(found)
    return seen


def stage_script(cmd: str) -> str:
    """The script a stage's cmd runs: `python -m stages.x` -> stages/x.py (or a `python stages/x.py` path)."""
    found = re.search(r"python3?\s+(?:-m\s+([\w.]+)|(\S+\.py))", cmd)
    assert found, f"no python entry point in {cmd!r}"
    return found.group(1).replace(".", "/") + ".py" if found.group(1) else found.group(2)


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def dep_paths(stage: dict) -> list[str]:
    return [next(iter(d)) if isinstance(d, dict) else d for d in stage.get("deps", [])]


def stage_code(name: str, stage: dict, root: Path = ROOT) -> list[str]:
    roots = [stage_script(stage["cmd"]), *EXTRA_ROOTS.get(name, [])]
    return sorted(f.relative_to(root).as_posix() for f in closure([root / r for r in roots], root))


def uncovered(name: str, stage: dict, root: Path = ROOT) -> list[str]:
    return [f for f in stage_code(name, stage, root) if not covered(f, dep_paths(stage))]


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_cover_its_code(name):
    missing = uncovered(name, STAGES[name])
    assert not missing, (f"dvc.yaml stage {name!r} runs {missing} but does not list them in its deps: editing them "
                         "would not rerun the stage. Add them to its deps (or stop importing them).")


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_list_no_module_it_does_not_run(name):
    """The other direction: a listed module the stage never imports reruns it for nothing (and hides drift)."""
    code = set(stage_code(name, STAGES[name]))
    stale = [d for d in dep_paths(STAGES[name]) if d.startswith(PACKAGE + "/") and d not in code]
    assert not stale, f"dvc.yaml stage {name!r} lists {stale} in its deps but does not import them; remove them"


def test_closure_sees_lazy_relative_and_package_imports(tmp_path):
    """The detector itself: a function-level import, a `from pkg import module`, a relative import and a package
    __init__ with code are all found; a docstring-only __init__ and third-party imports are not deps."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""Docstring only."""\n')
    (pkg / "sub" / "__init__.py").write_text("X = 1\n")
    (pkg / "a.py").write_text("import numpy\n\ndef f():\n    from pipeline import b\n")
    (pkg / "b.py").write_text("from . import c\n")
    (pkg / "c.py").write_text("from .sub import d\n")
    (pkg / "sub" / "d.py").write_text("import os\n")
    (pkg / "unused.py").write_text("")
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "s.py").write_text("from pipeline.a import f\n")
    found = {p.relative_to(tmp_path).as_posix() for p in closure([tmp_path / "stages" / "s.py"], tmp_path)}
    assert found == {"stages/s.py", "pipeline/a.py", "pipeline/b.py", "pipeline/c.py", "pipeline/sub/__init__.py",
                     "pipeline/sub/d.py"}
    stage = {"cmd": "python -m stages.s", "deps": ["stages/s.py", "pipeline/a.py", "pipeline/sub"]}
    assert uncovered("s", stage, tmp_path) == ["pipeline/b.py", "pipeline/c.py"]
