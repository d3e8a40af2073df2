"""The `fingerprint` stage: one code fingerprint per stage, built from what runs, not from how it is written.

A stage's code is its script `stages/<name>.py` and every `pipeline/` module that script imports, transitively
(imports inside functions and relative imports included: the code that can run, found without running it). Each
file is parsed and reduced to its syntax tree without docstrings; comments, blank lines and formatting never reach
the tree. The fingerprint is the sha256 of those trees, so:

- a comment, a docstring, a blank line, a reformat or a re-sorted block of imports leaves every fingerprint's bytes
  as they were, and DVC, which hashes files, reruns nothing downstream;
- any change to what runs (a statement, a default, an import) changes the fingerprint of every stage that runs it,
  and DVC reruns exactly those stages.

Docstrings never count, also where code reads them (`description=__doc__` in argparse): they change the `--help`
text, never an output. `fingerprints/<stage>.json` lists the stage's modules with their hashes, so the closure stays
visible where a user looks; the stages of dvc.yaml depend on that file instead of on the sources. The same
fingerprint stamps the persisted caches (checkpoints, shards): see provenance.stamp.
"""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

from pipeline.artifacts import atomic_write

PACKAGE = "pipeline"
ROOT = Path(__file__).resolve().parents[1]  # the repository: pipeline/ and stages/ side by side
STAGE_DIR = "stages"
THIS_STAGE = "fingerprint"  # its own output depends on every source file, so it has no fingerprint of its own
# Code a stage runs besides its script's imports: MLflow loads the registered pyfunc from its file at serving time.
EXTRA_ROOTS = {"register": ["pipeline/pyfunc.py"]}
# Bumped when the normalisation changes, which changes every fingerprint once.
NORMALISATION = 2


# --- the import closure ------------------------------------------------------------------------------------------


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """`pipeline.a.b` -> pipeline/a/b.py or pipeline/a/b/__init__.py (None when neither exists)."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


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
                package = list(path.relative_to(root).parts[:-1])
                package = package[: len(package) - node.level + 1]
                base = ".".join(filter(None, [*package, base]))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def has_code(path: Path) -> bool:
    """False for a module that is only a docstring (such a package __init__ runs nothing)."""
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


def stage_code(stage: str, root: Path = ROOT) -> list[str]:
    """The files a stage runs, relative to `root`, sorted."""
    script = root / STAGE_DIR / f"{stage}.py"
    if not script.is_file():
        raise ValueError(f"no stage script {script}")
    roots = [script, *(root / extra for extra in EXTRA_ROOTS.get(stage, []))]
    return sorted(path.relative_to(root).as_posix() for path in closure(roots, root))


def stage_names(root: Path = ROOT) -> list[str]:
    return sorted(p.stem for p in (root / STAGE_DIR).glob("*.py") if p.stem != THIS_STAGE)


# --- what runs ---------------------------------------------------------------------------------------------------


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def _canonical(node) -> object:
    """A node as plain data: its type and its fields, without positions. Empty and None fields are left out, so the
    form does not change when a Python release adds a field that this code does not use (3.12's type_params)."""
    if isinstance(node, ast.AST):
        fields = {name: _canonical(value) for name, value in ast.iter_fields(node) if value is not None and value != []}
        return [type(node).__name__, fields]
    if isinstance(node, list):
        return _sorted_import_runs([_canonical(item) for item in node])
    if isinstance(node, (bytes, complex)) or (isinstance(node, float) and node != node):
        return repr(node)
    if node is Ellipsis:
        return "..."
    return node


def _sorted_import_runs(items: list) -> list:
    """Each run of consecutive import statements as a sorted list of one-name imports: the order and grouping that a
    linter sorts imports into (`from x import a, b` or two lines) is layout, not code."""
    out, run = [], []
    for item in [*items, None]:
        if isinstance(item, list) and item and item[0] in ("Import", "ImportFrom"):
            run += [[item[0], {**item[1], "names": [alias]}] for alias in item[1]["names"]]
            continue
        out += sorted(run, key=lambda imp: json.dumps(imp, sort_keys=True)) + ([item] if item is not None else [])
        run = []
    return out


def code_hash(source: str, filename: str = "<source>") -> str:
    """sha256 of the docstring-free syntax tree of `source`: blind to comments, docstrings and layout."""
    tree = _strip_docstrings(ast.parse(source, filename))
    text = json.dumps(_canonical(tree), sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def fingerprint(stage: str, root: Path = ROOT) -> dict:
    """`{"stage", "fingerprint", "modules": {path: code hash}}` of a stage's code."""
    modules = {rel: code_hash((root / rel).read_text(), rel) for rel in stage_code(stage, root)}
    identity = json.dumps({"normalisation": NORMALISATION, "modules": modules}, sort_keys=True)
    return {"stage": stage, "fingerprint": hashlib.sha256(identity.encode()).hexdigest(), "modules": modules}


def write_fingerprints(out_dir: str | Path, root: Path = ROOT) -> dict[str, str]:
    """`<out_dir>/<stage>.json` for every stage; a file whose content is unchanged is not rewritten."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for stage in stage_names(root):
        record = fingerprint(stage, root)
        text = json.dumps(record, indent=2, sort_keys=True) + "\n"
        path = out_dir / f"{stage}.json"
        if not path.is_file() or path.read_text() != text:
            atomic_write(path, lambda tmp: tmp.write_text(text))
        written[stage] = record["fingerprint"]
    return written
