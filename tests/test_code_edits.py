"""Long runs survive code edits: with real `dvc repro` on the reduced default, an edit that changes no code reruns
nothing but the fingerprint stage; a real change reruns the stages that run it, and only those whose inputs moved;
and a training run that no longer matches its code is moved aside, never deleted.

The three tests share one repository and run in order: each leaves the sources as it found them.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import time
from pathlib import Path

import pytest
import yaml
from reduced_default import REDUCED, copy_finished_run, run
from test_lineage import edit_without_code

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def repo(reduced_run, tmp_path_factory):
    """The reduced default after one full `dvc repro` (a copy of the session's run), committed."""
    repo = copy_finished_run(reduced_run, tmp_path_factory.mktemp("code-edits") / "repo")
    env = reduced_run.env
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "run"], repo, env)
    return repo, env


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


def lock(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]


def restore_sources(repo: Path, env: dict) -> None:
    run(["git", "checkout", "--", "pipeline", "stages"], repo, env)


def test_comments_and_docstrings_everywhere_rerun_nothing(repo):
    repo, env = repo
    before = lock(repo)
    sources = sorted([*repo.glob("pipeline/**/*.py"), *repo.glob("stages/*.py")])
    for path in sources:
        path.write_text(edit_without_code(path.read_text()))
    start = time.monotonic()
    output = run(["dvc", "repro"], repo, env)
    print(f"dvc repro after a comment and docstring edit in {len(sources)} files: {time.monotonic() - start:.1f} s")
    assert ran(output) == ["fingerprint"], output[-3000:]
    after = lock(repo)
    assert after["fingerprint"]["deps"] != before["fingerprint"]["deps"]  # it saw the edit...
    assert after["fingerprint"]["outs"] == before["fingerprint"]["outs"]  # ...and wrote the same fingerprints
    assert {s: e for s, e in after.items() if s != "fingerprint"} == {
        s: e for s, e in before.items() if s != "fingerprint"
    }
    restore_sources(repo, env)
    assert ran(run(["dvc", "repro"], repo, env)) == ["fingerprint"]


def insert_statement(path: Path, function: str, statement: str) -> None:
    """`statement` as the first statement of `function`'s body (after its docstring), at its indentation."""
    text = path.read_text()
    node = next(n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.FunctionDef) and n.name == function)
    body = node.body[1:] if ast.get_docstring(node) is not None else node.body
    first = body[0]
    lines = text.splitlines(keepends=True)
    lines.insert(first.lineno - 1, " " * first.col_offset + statement + "\n")
    path.write_text("".join(lines))


def test_a_statement_in_the_vae_trainer_reruns_only_vae(repo):
    repo, env = repo
    before = lock(repo)
    insert_statement(repo / "pipeline/vae.py", "fit", "assert params.train_steps >= 1")
    output = run(["dvc", "repro"], repo, env)
    assert ran(output) == ["fingerprint", "vae"], output[-3000:]  # the same bytes: nothing downstream reruns
    model = [o for o in lock(repo)["vae"]["outs"] if o["path"] == "models/vae"]
    assert model == [o for o in before["vae"]["outs"] if o["path"] == "models/vae"]  # (metrics/vae.json: seconds)
    restore_sources(repo, env)
    # Back to the committed code: vae reruns, or DVC's run cache restores its earlier run; nothing downstream runs.
    assert ran(run(["dvc", "repro"], repo, env)) in (["fingerprint", "vae"], ["fingerprint"])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_change_to_the_training_loop_trains_afresh_and_moves_the_old_checkpoints_aside(repo):
    repo, env = repo
    checkpoints = repo / "models/checkpoints"
    old = {p.name: sha256(p) for p in checkpoints.glob("ckpt-*.pt")}
    assert old
    insert_statement(repo / "pipeline/train.py", "train_step", "assert lr >= 0")
    output = run(["dvc", "repro", "train"], repo, env)
    assert "fingerprint" in ran(output) and "train" in ran(output), output[-3000:]
    assert re.search(r"moved .*models/checkpoints", output), output[-3000:]  # said in one line, with where to
    new = json.loads((repo / "metrics/train.json").read_text())
    assert new["steps"] == REDUCED["train"]["train_steps"]
    # Trained from step 0: every kept checkpoint is new, and the old ones are found elsewhere, byte for byte.
    assert all(sha256(checkpoints / name) != digest for name, digest in old.items() if (checkpoints / name).exists())
    moved = {p.name: sha256(p) for p in repo.rglob("ckpt-*.pt") if checkpoints not in p.parents}
    assert moved == old
    outs = [
        next(iter(o)) if isinstance(o, dict) else o
        for s in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].values()
        for o in s.get("outs", [])
    ]
    for path in repo.rglob("ckpt-*.pt"):
        if checkpoints not in path.parents:  # the superseded set lies outside every DVC output: never pushed
            assert not any(Path(repo / o) in [path, *path.parents] for o in outs), path
    restore_sources(repo, env)
