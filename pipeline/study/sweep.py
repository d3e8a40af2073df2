"""`python -m pipeline.study.sweep`: the study plan (sweeps/study-plan.yaml) run as queued `dvc exp` experiments.

    python -m pipeline.study.sweep plan                 # every planned run, the count, the time estimate and its parts
    python -m pipeline.study.sweep run --hours 2        # run what is not done, stopping before the budget is crossed
    python -m pipeline.study.sweep collect [NAME ...]   # write the records of finished experiments of this workspace

A run is done iff its record docs/results/runs/<name>.json exists: experiment refs and DVC's cache do not survive
to the next invocation (a fresh clone), so each finished experiment is read at once through DVC's Python API
(`dvc.api.exp_show` for its rev and state, `dvc.api.params_show` and `dvc.api.read` at that rev for its params,
metrics and records) and written atomically to its record, which the lead commits. `python -m pipeline.study.report`
renders docs/results.md from the records alone.

A training run is `dvc exp run --queue -n NAME curve evaluate -S ...` from HEAD, then `dvc exp run --run-all
--jobs 1`. A sampling run (only sample.* keys differ) must not train again, and DVC's run cache cannot spare it:
`train` (models/checkpoints) and `sample` (data/samples/shards) have persistent outputs, which DVC never puts in
the run cache. So its training run is applied to the workspace (`dvc exp apply`: its dvc.lock and params), the
sampling runs are queued and run from there (the queued copy gets the lock, checks out the trained model from the
cache and finds `train` unchanged), and then the workspace files that apply wrote are put back as they were. The
record says whether `train` ran again (`train_rerun`), from the two runs' metrics/train.json. A sampling run whose
training run is not in this workspace's experiments (it finished in an earlier clone) first trains it again, under
its own name.

A failed experiment is reported by name with the tail of `dvc queue logs` and skipped; the next invocation retries.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline import provenance, synthetic
from pipeline.artifacts import atomic_write, atomic_write_json
from pipeline.errors import UserError, run_main
from pipeline.params.load import read_yaml
from pipeline.study import verdicts
from pipeline.study.plan import PLAN_FILE, PlannedRun, estimate_s, expand, load_plan, lookup, model_shape, parts

RUNS_DIR = Path("docs/results/runs")
PLAN_DOC = "docs/study-plan.md"
# Git-tracked files `dvc exp apply` rewrites (params, the lock, the cache: false outputs of dvc.yaml); put back after.
APPLIED_GLOBS = ("params.yaml", "dvc.lock", "metrics/*.json", "reports/*.json", "plots/*.csv")
APPLIED_COPY = ("dvc.lock", "metrics", "reports", "plots")  # what a sampling run's queued copy needs of them
METRICS = {"train": "metrics/train.json", "sample": "metrics/sample.json", "eval": "metrics/eval.json"}
EVAL_REPORT, CURVE_REPORT = "reports/eval.json", "reports/curve.json"


# --- DVC ----------------------------------------------------------------------------------------------------------


def dvc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The `dvc` next to this interpreter, output captured; a failure with check raises with DVC's own message."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.setdefault("RAY_AUTH_MODE", "token")
    result = subprocess.run(["dvc", *args], env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise UserError(f"`dvc {' '.join(args[:4])} ...` failed: {(result.stderr or result.stdout).strip()[-1500:]}")
    return result


def head() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()


def experiments(baseline: str) -> dict[str, dict]:
    """{name: row} of the experiments queued from commit `baseline`, as `dvc.api.exp_show` lists them. Always the
    commit a run started from, not HEAD: a commit made while a batch runs would otherwise hide its experiments
    (this happened: 8 finished sampling runs were reported failed)."""
    import dvc.api

    rows = dvc.api.exp_show(revs=[baseline], force=True)
    return {row["Experiment"]: row for row in rows if row.get("Experiment") and row.get("typ") != "baseline"}


def failure_log(name: str) -> str:
    logs = dvc("queue", "logs", name, check=False)
    text = (logs.stdout + logs.stderr).strip().splitlines()
    return "\n".join(text[-15:]) or "(no log)"


def run_queue(runs: list[PlannedRun], baseline: str) -> tuple[float, dict[str, str]]:
    """Run the queued experiments one at a time; (wall seconds, {name: error} of those that failed)."""
    start = time.perf_counter()
    dvc("exp", "run", "--run-all", "--jobs", "1", check=False)  # a failed experiment is found below, by name
    wall = time.perf_counter() - start
    rows = experiments(baseline)
    failed = {}
    for run in runs:
        row = rows.get(run.name)
        if row is None or row.get("State") not in (None, "Success"):
            failed[run.name] = failure_log(run.name)
    return wall, failed


def clear(name: str) -> None:
    """Drop a leftover experiment or queue entry of this name (a failed earlier try)."""
    dvc("queue", "remove", name, check=False)
    dvc("exp", "remove", name, check=False)


def queue(run: PlannedRun, plan: dict) -> None:
    """Queue from the workspace as it is (HEAD, or a training run applied): only keys that differ are passed. A
    sampling run also carries the applied dvc.lock and the cache: false outputs (`--copy-paths`, copied from the
    workspace when the run starts): the queue's stash holds tracked changes only, HEAD may have none of them (or
    another run's), and without metrics/train.json and plots/train.csv DVC would find `train` changed and run it
    again."""
    clear(run.name)
    copy = [a for p in copied_paths(APPLIED_COPY) for a in ("--copy-paths", p)] if run.kind == "sampling" else []
    dvc("exp", "run", "--queue", "-n", run.name, *copy, *run.targets, *run.set_args(plan, read_yaml("params.yaml")))


def copied_paths(paths) -> list[str]:
    """What `--copy-paths` names for `paths`: each one that exists here, but a directory that git tracks files in
    (a committed run's metrics/, say) file by file. The queued copy is a checkout of HEAD, so such a directory is
    already there, and DVC refuses to copy a directory over one (a file it overwrites)."""
    out = []
    for path in map(Path, paths):
        if not path.exists():
            continue
        tracked = subprocess.run(["git", "ls-files", "--", str(path)], capture_output=True, text=True, check=True)
        if path.is_dir() and tracked.stdout.strip():
            out += [str(f) for f in sorted(path.iterdir()) if f.is_file()]
        else:
            out.append(str(path))
    return out


@contextmanager
def applied(name: str):
    """The workspace with experiment `name` applied; afterwards the files apply wrote are as they were.

    `dvc exp apply` also checks out the experiment's version of every git-tracked file, records included: a record
    rewritten here (a run redone on another reference) would go back to HEAD's. So the records are put
    back at once."""
    saved = {p: p.read_bytes() for g in APPLIED_GLOBS for p in Path().glob(g)}
    records = {p: p.read_bytes() for p in RUNS_DIR.glob("*.json")}
    dvc("exp", "apply", name)
    for path, data in records.items():
        if path.read_bytes() != data:
            atomic_write(path, lambda tmp, data=data: tmp.write_bytes(data))
    try:
        yield
    finally:
        for path in {p for g in APPLIED_GLOBS for p in Path().glob(g)} - set(saved):
            path.unlink()
        for path, data in saved.items():
            atomic_write(path, lambda tmp, data=data: tmp.write_bytes(data))


# --- records ------------------------------------------------------------------------------------------------------


def plan_commit(path: Path = PLAN_FILE) -> str:
    """The last commit of the plan (the YAML and docs/study-plan.md); the plan must be committed as it is on disk.
    git answers about the plan's files only: experiments are read through dvc.api."""
    files = [str(path)] + [PLAN_DOC] * Path(PLAN_DOC).exists()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *files], capture_output=True, text=True)
    if dirty.returncode != 0 or dirty.stdout.strip():
        raise UserError(f"{' or '.join(files)} has uncommitted changes: commit the plan first")
    log = subprocess.run(["git", "log", "-1", "--format=%H", "--", *files], capture_output=True, text=True)
    if log.returncode != 0 or not log.stdout.strip():
        raise UserError(f"{path} is not in a commit: commit the plan first")
    return log.stdout.strip()


def read_json(path: str, rev: str) -> dict | None:
    import dvc.api

    try:
        return json.loads(dvc.api.read(path, repo=".", rev=rev))
    except Exception:  # noqa: BLE001  a file the experiment does not have (e.g. no curve for a sampling run)
        return None


def record(run: PlannedRun, plan: dict, commit: str, row: dict, wall_s: float, base_train: dict | None) -> dict:
    """One run's record: what ran, under which plan, its numbers and times, all read at the experiment's rev."""
    import dvc.api

    rev = row["rev"]
    params = dvc.api.params_show(repo=".", rev=rev)
    metrics = {k: read_json(path, rev) for k, path in METRICS.items()}
    curve = read_json(CURVE_REPORT, rev) if run.kind == "train" else None
    eval_report = read_json(EVAL_REPORT, rev) or {}
    if metrics["eval"] is None:
        raise UserError(f"experiment {run.name} ({rev[:7]}) has no {METRICS['eval']}: it did not reach evaluate")
    off_plan = {k: (lookup(params, k), v) for k, v in run.overrides(plan).items() if lookup(params, k) != v}
    if off_plan:
        raise UserError(f"experiment {run.name} ({rev[:7]}) ran other params than the plan's: {off_plan}")
    shape = model_shape(run, plan)
    out = {
        "name": run.name,
        "kind": run.kind,
        "base": run.base,
        "studies": list(run.studies),
        "model": run.model,
        "conditioning": run.conditioning,
        "seed": run.seed,
        "patch": int(run.model.split("/")[1]),
        "size": run.model.removeprefix("DiT-").split("/")[0],
        **shape,
        "plan": {"name": plan["name"], "commit": commit, "sha256": plan["sha256"]},
        "experiment": {"rev": rev, "targets": list(run.targets), "overrides": run.overrides(plan)},
        "params": {k: params[k] for k in ("train", "sample", "curve", "evaluate") if k in params},
        "eval": metrics["eval"],
        "eval_protocol": eval_report.get("protocol"),
        "train": metrics["train"],
        "sample": metrics["sample"],
        "wall_s": {
            "experiment": round(wall_s, 1),
            "train": (metrics["train"] or {}).get("seconds"),
            "sample": (metrics["sample"] or {}).get("seconds"),
        },
        "machine": provenance.machine(),  # the report pools only runs against one reference (pipeline.study.verdicts)
    }
    if curve is not None:
        out["curve"] = {
            k: curve.get(k)
            for k in (
                "steps",
                "fid",
                "class_consistency",
                "kid",
                "final_step",
                "final_fid",
                "final_class_consistency",
                "protocol",
            )
        }
    if run.kind == "sampling":
        out["train_rerun"] = base_train is None or metrics["train"] != base_train
    return out


def write_record(rec: dict, runs_dir: Path = RUNS_DIR) -> Path:
    return atomic_write_json(runs_dir / f"{rec['name']}.json", rec)


def done(plan: dict, runs_dir: Path = RUNS_DIR) -> set[str]:
    """The planned runs whose record the report pools: a record measured against another reference than most
    (another machine's data stages, pipeline.study.verdicts.one_reference) is run again, here, and replaced."""
    planned = {r.name for r in expand(plan)}
    records = [json.loads(p.read_text()) for p in runs_dir.glob("*.json") if p.stem in planned]
    return {r["name"] for r in verdicts.one_reference(records)[0]}


# --- commands -----------------------------------------------------------------------------------------------------


def check_data(plan: dict) -> None:
    if synthetic.GENERATOR_VERSION != plan["synthetic_version"]:
        raise UserError(
            f"the plan is for synthetic generator version {plan['synthetic_version']}, the code draws "
            f"version {synthetic.GENERATOR_VERSION}: the sweep would not measure what its plan says"
        )


def cmd_plan(plan: dict, hours: float) -> None:
    runs = expand(plan)
    finished = done(plan)
    chunks = parts(runs, plan, hours)
    total = sum(s for chunk in chunks for _, s in chunk) + len(chunks) * plan["estimate"]["data_stages_s"]
    for i, chunk in enumerate(chunks, 1):
        seconds = plan["estimate"]["data_stages_s"] + sum(s for _, s in chunk)
        print(f"part {i}: {len(chunk)} runs, ~{seconds / 3600:.2f} h (data stages included)")
        for run, s in chunk:
            state = "done" if run.name in finished else f"~{s / 60:.1f} min"
            extra = " ".join(f"{k}={v}" for k, v in run.sampling.items())
            print(f"  {run.name:36s} {' '.join(run.targets):15s} {extra:50s} {state}")
    n_train = sum(r.kind == "train" for r in runs)
    n_done = len(finished & {r.name for r in runs})
    print(
        f"{len(runs)} runs ({n_train} training, {len(runs) - n_train} sampling-only), {n_done} done; "
        f"estimate {total / 3600:.2f} h in {len(chunks)} parts of at most {hours:g} h "
        f"(measured on a shared 2-core machine, see docs/study-plan.md)"
    )


def batches(pending: list[PlannedRun]) -> list[list[PlannedRun]]:
    """Consecutive pending runs grouped into what one `--run-all` executes: a training run alone, or the sampling
    runs of one training run together (queued from its applied lock)."""
    out: list[list[PlannedRun]] = []
    for run in pending:
        if run.kind == "sampling" and out and out[-1][0].kind == "sampling" and out[-1][0].base == run.base:
            out[-1].append(run)
        else:
            out.append([run])
    return out


def execute(batch: list[PlannedRun], plan: dict, commit: str, baseline: str) -> tuple[float, list[str]]:
    """Queue and run one batch, write the records of the runs that finished; (wall seconds, failed names)."""
    base = batch[0].base
    base_train = None
    if base is None:
        for run in batch:
            queue(run, plan)
        wall, failed = run_queue(batch, baseline)
    else:
        if base not in experiments(baseline):  # trained in an earlier clone: train it again (deterministic) to apply it
            ref = next(r for r in expand(plan) if r.name == base)
            queue(ref, plan)
            _, failed = run_queue([ref], baseline)
            if failed:
                return 0.0, [f"{r.name}: its training run {base} failed again:\n{failed[base]}" for r in batch]
        base_train = read_json(METRICS["train"], experiments(baseline)[base]["rev"])
        try:
            with applied(base):  # kept while the batch runs: the queue copies the applied dvc.lock when it starts
                for run in batch:
                    queue(run, plan)
                wall, failed = run_queue(batch, baseline)
        except UserError as e:
            return 0.0, [f"{r.name}: could not run it on {base}'s lock: {e}" for r in batch]
    rows = experiments(baseline)
    for run in batch:
        if run.name not in failed:
            rec = record(run, plan, commit, rows[run.name], wall / len(batch), base_train)
            print(
                f"  recorded {write_record(rec)}: FID {rec['eval'].get('fid'):.2f}, "
                f"class consistency {rec['eval'].get('class_consistency'):.3f}"
                + (" (train ran again!)" if rec.get("train_rerun") else ""),
                flush=True,
            )
    return wall, [f"{name}:\n{log}" for name, log in failed.items()]


def cmd_run(plan: dict, hours: float, only: list[str] | None) -> int:
    check_data(plan)
    commit = plan_commit(Path(plan["path"]))
    pending = [r for r in expand(plan) if r.name not in done(plan) and (not only or r.name in only)]
    dvc("queue", "remove", "--queued", check=False)  # a stale queue would run inside our first --run-all
    budget, elapsed, data_s = hours * 3600, 0.0, plan["estimate"]["data_stages_s"]
    failures, failed_names = [], set()
    todo = batches(pending)
    baseline = head()  # experiments are queued from it; a commit while the sweep runs stops it (below)
    for i, batch in enumerate(todo):
        if head() != baseline:
            print(
                f"stopping: HEAD moved from {baseline[:10]} while the sweep ran; commit the records after it "
                "ends, then run it again",
                flush=True,
            )
            break
        if batch[0].base in failed_names:
            failures += [f"{r.name}: skipped, its training run {r.base} failed" for r in batch]
            continue
        estimate = sum(estimate_s(r, plan) for r in batch) + (data_s if i == 0 else 0)
        if elapsed + estimate > budget:
            print(
                f"stopping: the next batch ({batch[0].name}, ~{estimate / 60:.0f} min) would cross the "
                f"{hours:g} h budget ({elapsed / 60:.0f} min used)"
            )
            break
        left = sum(len(b) for b in todo[i:])
        print(
            f"[{elapsed / 60:.0f} min / {hours * 60:.0f} min] running {', '.join(r.name for r in batch)} "
            f"(~{estimate / 60:.0f} min; {left} runs left)",
            flush=True,
        )
        start = time.perf_counter()
        _, failed = execute(batch, plan, commit, baseline)
        elapsed += time.perf_counter() - start
        failed_names |= {f.split(":")[0] for f in failed}
        for f in failed:
            print(f"FAILED {f}", file=sys.stderr, flush=True)
        failures += failed
    planned = {r.name for r in expand(plan)}
    print(
        f"{len(done(plan) & planned)} of {len(planned)} planned runs recorded in {RUNS_DIR}; {len(failures)} failed "
        "this time (rerun to retry); "
        f"commit the records: git add {RUNS_DIR}"
    )
    return 1 if failures else 0


def cmd_collect(plan: dict, names: list[str], baseline: str | None) -> None:
    """Records of finished experiments queued from `baseline` (default HEAD; e.g. after `dvc exp run` by hand, or
    runs the runner could not see), by planned name."""
    commit = plan_commit(Path(plan["path"]))
    rows = experiments(baseline or head())
    planned = {r.name: r for r in expand(plan)}
    for name in names or [n for n in planned if n in rows]:
        if name not in planned:
            raise UserError(f"{name} is not a run of {PLAN_FILE}; `python -m pipeline.study.sweep plan` lists them")
        if name not in rows or rows[name].get("State") not in (None, "Success"):
            raise UserError(f"no finished experiment named {name} in this workspace (`dvc exp show`)")
        run = planned[name]
        base_train = read_json(METRICS["train"], rows[run.base]["rev"]) if run.base in rows else None
        print(write_record(record(run, plan, commit, rows[name], float("nan"), base_train)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.study.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--plan", type=Path, default=PLAN_FILE)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plan").add_argument("--hours", type=float, default=2.0, help="the length of one part")
    run = sub.add_parser("run")
    run.add_argument("--hours", type=float, required=True, help="this invocation's budget; stops before crossing it")
    run.add_argument("--only", nargs="+", help="planned run names to run (default: all not done)")
    collect = sub.add_parser("collect")
    collect.add_argument("names", nargs="*")
    collect.add_argument("--rev", help="the commit the experiments were queued from (default HEAD)")
    args = parser.parse_args(argv)
    plan = load_plan(args.plan)
    if args.command == "plan":
        cmd_plan(plan, args.hours)
    elif args.command == "run":
        sys.exit(cmd_run(plan, args.hours, args.only))
    else:
        cmd_collect(plan, args.names, args.rev)


if __name__ == "__main__":
    run_main(main)
