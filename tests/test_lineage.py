"""Lineage DVC can see: each stage depends on its code fingerprint, and the fingerprint covers the code it runs.

The closure walker of pipeline/fingerprint.py is checked three ways: on a made-up package whose answer is known
(lazy, relative and package imports); here, against dvc.yaml (every stage depends on its fingerprint file and on no
source file); and in the end-to-end run (tests/test_pipeline_e2e.py), against the `pipeline` modules each stage's
processes actually loaded, Ray workers included.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipeline import fingerprint as F

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
CODE_STAGES = sorted(s for s in STAGES if s != F.THIS_STAGE)


def dep_paths(stage: dict) -> list[str]:
    return [next(iter(d)) if isinstance(d, dict) else d for d in stage.get("deps", [])]


def out_paths(stage: dict) -> list[str]:
    return [next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])]


def stage_script(cmd: str) -> str:
    """The script a stage's cmd runs: `python -m stages.x` -> stages/x.py."""
    found = re.search(r"python3?\s+-m\s+([\w.]+)", cmd)
    assert found, f"no `python -m` entry point in {cmd!r}"
    return found.group(1).replace(".", "/") + ".py"


def test_the_fingerprint_stage_reads_every_source_and_writes_one_file_per_stage():
    stage = STAGES[F.THIS_STAGE]
    assert set(dep_paths(stage)) == {"stages", "pipeline"}
    assert sorted(out_paths(stage)) == sorted(f"fingerprints/{s}.json" for s in CODE_STAGES)
    assert CODE_STAGES == F.stage_names()  # one stages/<name>.py per dvc.yaml stage, and no other


@pytest.mark.parametrize("name", CODE_STAGES)
def test_a_stage_depends_on_its_fingerprint_and_on_no_source_file(name):
    deps = dep_paths(STAGES[name])
    assert f"fingerprints/{name}.json" in deps
    sources = [d for d in deps if d.split("/")[0] in ("pipeline", "stages")]
    assert not sources, f"{name} lists {sources}: a comment there would rerun it; its fingerprint covers them"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_a_stage_is_named_like_its_script_and_its_module(name):
    """From a stage in dvc.yaml to its code in one step: stages/<name>.py calls pipeline/<name>.py."""
    assert stage_script(STAGES[name]["cmd"]) == f"stages/{name}.py"
    assert (ROOT / "pipeline" / f"{name}.py").is_file()
    assert f"pipeline/{name}.py" in F.stage_code(name) if name != F.THIS_STAGE else True


def test_a_stage_module_reaches_only_its_own_stage():
    """Editing one stage's module reruns that stage alone: no other stage's closure holds it."""
    closures = {s: set(F.stage_code(s)) for s in CODE_STAGES}
    shared = {
        f"pipeline/{s}.py": sorted(t for t in CODE_STAGES if t != s and f"pipeline/{s}.py" in closures[t])
        for s in CODE_STAGES
    }
    assert not {m: ts for m, ts in shared.items() if ts}


def test_closure_sees_lazy_relative_and_package_imports(tmp_path):
    """The walker itself: a function-level import, a `from pkg import module`, a relative import and a package
    __init__ with code are all found; a docstring-only __init__ and third-party imports are not."""
    pkg = tmp_path / F.PACKAGE
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
    assert F.stage_code("s", tmp_path) == [
        "pipeline/a.py",
        "pipeline/b.py",
        "pipeline/c.py",
        "pipeline/sub/__init__.py",
        "pipeline/sub/d.py",
        "stages/s.py",
    ]
    assert F.stage_names(tmp_path) == ["s"]


SOURCE = '''"""Module docstring."""
import math
import os
from pathlib import Path, PurePath


def f(x, y=2):
    """Function docstring."""
    # a comment
    return math.sqrt(x) + y
'''


def test_the_code_hash_ignores_comments_docstrings_and_layout_but_not_code():
    same = [
        SOURCE.replace("# a comment", "# another comment\n    # and one more"),
        SOURCE.replace('"""Module docstring."""', '"""Module docstring,\n\nrewritten."""'),
        SOURCE.replace('    """Function docstring."""\n', ""),
        SOURCE.replace("def f(x, y=2):", "def f(\n    x,\n    y = 2,\n):").replace("\n\n\n", "\n\n\n\n"),
        SOURCE.replace("return math.sqrt(x) + y", "return (math.sqrt(x)\n            + y)  # trailing"),
        SOURCE.replace("import math\nimport os", "import os\nimport math"),  # a linter's sort
        SOURCE.replace("from pathlib import Path, PurePath", "from pathlib import PurePath\nfrom pathlib import Path"),
    ]
    different = [
        SOURCE.replace("y=2", "y=3"),
        SOURCE.replace("math.sqrt(x) + y", "y + math.sqrt(x)"),
        SOURCE.replace("    return", "    x = float(x)\n    return"),
        SOURCE.replace("import os\n", "import sys\n"),
        SOURCE.replace("    return", "    import os\n    return"),
    ]
    base = F.code_hash(SOURCE)
    assert all(F.code_hash(s) == base for s in same)
    assert len({F.code_hash(s) for s in different} | {base}) == len(different) + 1


@pytest.mark.parametrize(
    "path", sorted(p.relative_to(ROOT).as_posix() for p in [*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("stages/*.py")])
)
def test_every_source_file_keeps_its_code_hash_under_a_comment_and_a_docstring_edit(path):
    text = (ROOT / path).read_text()
    assert F.code_hash(text) == F.code_hash(edit_without_code(text)), path


def edit_without_code(text: str) -> str:
    """A comment after the imports' start and a sentence added to the module docstring (or a new docstring)."""
    lines = text.splitlines(keepends=True)
    if text.startswith('"""'):
        lines[0] = lines[0].replace('"""', '"""Edited. ', 1)
    else:
        lines.insert(0, '"""A new docstring."""\n')
    lines.insert(
        len(lines) // 2 if not lines[len(lines) // 2].startswith((" ", "\t", ")")) else len(lines),
        "# an edited comment\n",
    )
    return "".join(lines) + "\n# a trailing comment\n"
