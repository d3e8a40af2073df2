"""Wall time of the default DAG as a new user meets it: a fresh clone of a revision, `make repro` (or `dvc repro`)
with an installed virtual environment, each stage's wall time and its start-up share, and the total.

    python bench/wall_time.py                       # HEAD, one run, `make repro` with the venv of this python
    python bench/wall_time.py --rev main --runs 3   # the median of 3 fresh clones
    python bench/wall_time.py --rev OLD --rev NEW --runs 3   # before/after, interleaved OLD, NEW, OLD, NEW, ...

The install is excluded: the clone uses an existing venv (`--venv`, default the one running this script) and
`make -o` keeps the Makefile from reinstalling into it. A stage's wall time runs from DVC's "Running stage" line to
the next stage's (so it includes DVC's hashing and saving of its outputs, as a user waits for them). Its start-up
is process launch to first useful work, from the timings each stage records when PIPELINE_TIMINGS_DIR is set
(pipeline/timing.py: `ready` is marked by the stage at its first step or batch, even inside a Ray worker; a stage
without that mark counts its imports only). Revisions older than those records show wall times only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNNING = re.compile(r"Running stage '([^']+)'")
TIMINGS = Path("reports") / "timings"


def set_params(repo: Path, overrides: list[str]) -> None:
    """`--set train.train_steps=20`: edit the clone's params.yaml (a smoke run of this script; the figures of a
    modified DAG are not the default's)."""
    import yaml

    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for item in overrides:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = params
        for name in parents:
            node = node[name]
        if leaf not in node:
            raise SystemExit(f"--set {item}: params.yaml has no key {key}")
        node[leaf] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def clone(rev: str, into: Path) -> str:
    """A fresh clone of this repository at `rev` (detached); returns the full commit id."""
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(into)], check=True)
    subprocess.run(["git", "checkout", "-q", "--detach", commit], cwd=into, check=True)
    return commit


def run_env(venv: Path, repo: Path) -> dict:
    """The environment of a new user's shell with the venv first on PATH: no PYTHONPATH from the calling shell (the
    clone's own `pipeline` must run), offline hub, Ray with token authentication, timings recorded."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PIPELINE_TIMINGS_DIR", "PIPELINE_STAGE", "PIPELINE_LOCAL_RAY")
    }
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        RAY_AUTH_MODE="token",
        PIPELINE_TIMINGS_DIR=str(repo / TIMINGS),
    )
    return env


def repro_command(how: str, venv: Path) -> list[str]:
    if how == "dvc":
        return ["dvc", "repro"]
    return ["make", "repro", f"VENV={venv}", "-o", f"{venv}/.installed"]  # -o: never reinstall into the venv


def stage_walls(events: list[tuple[float, str]], end: float) -> dict[str, float]:
    """{stage: seconds} from (time, stage) of each "Running stage" line, in order; the last runs until `end`."""
    walls = {}
    for (t, stage), nxt in zip(events, [e[0] for e in events[1:]] + [end]):
        walls[stage] = nxt - t
    return walls


def startup_seconds(timings_file: Path) -> float | None:
    """Launch to first useful work of one stage, from its timings record (earliest `ready`, else `imported`)."""
    if not timings_file.is_file():
        return None
    events: dict[str, list[float]] = {}
    for line in timings_file.read_text().splitlines():
        e = json.loads(line)
        events.setdefault(e["event"], []).append(e["t"])
    if "start" not in events:
        return None
    ready = events.get("ready") or events.get("imported")
    return min(ready) - min(events["start"]) if ready else None


def one_run(rev: str, venv: Path, how: str, keep: bool, overrides: list[str] = ()) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="wall_time-"))
    repo = tmp / "repo"
    try:
        commit = clone(rev, repo)
        if overrides:
            set_params(repo, overrides)
        start = time.perf_counter()
        events: list[tuple[float, str]] = []
        log = []
        with subprocess.Popen(
            repro_command(how, venv),
            cwd=repo,
            env=run_env(venv, repo),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        ) as proc:
            for line in proc.stdout:
                log.append(line)
                found = RUNNING.search(line)
                if found:
                    events.append((time.perf_counter() - start, found.group(1)))
                    print(f"  {events[-1][0]:7.1f} s  {found.group(1)}", file=sys.stderr, flush=True)
        total = time.perf_counter() - start
        if proc.returncode != 0:
            sys.stderr.write("".join(log[-40:]))
            raise SystemExit(f"{' '.join(repro_command(how, venv))} failed (exit {proc.returncode}) at {rev}")
        walls = stage_walls(events, total)
        startups = {s: startup_seconds(repo / TIMINGS / f"{s}.jsonl") for s in walls}
        metrics = {}
        for name in ("eval", "train"):
            path = repo / "metrics" / f"{name}.json"
            metrics[name] = json.loads(path.read_text()) if path.is_file() else None
        return {
            "rev": rev,
            "commit": commit,
            "total": total,
            "walls": walls,
            "startups": startups,
            "before_first_stage": events[0][0] if events else total,
            "metrics": metrics,
            "overrides": list(overrides),
        }
    finally:
        if keep:
            print(f"kept {repo}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def fmt_min(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:04.1f} s"


def summarise(runs: list[dict]) -> str:
    """A table of the median wall time and start-up of every stage over `runs` (one revision), and the totals."""
    stages = list(dict.fromkeys(s for r in runs for s in r["walls"]))
    changed = f", NOT the default: --set {' '.join(runs[0]['overrides'])}" if runs[0].get("overrides") else ""
    lines = [
        f"rev {runs[0]['rev']} ({runs[0]['commit'][:10]}), {len(runs)} run(s), medians{changed}",
        f"{'stage':<12}{'wall s':>9}{'start-up s':>12}{'share':>8}",
    ]
    startup_total = 0.0
    for s in stages:
        wall = statistics.median(r["walls"][s] for r in runs if s in r["walls"])
        ups = [r["startups"].get(s) for r in runs if r["startups"].get(s) is not None]
        up = statistics.median(ups) if ups else None
        startup_total += up or 0.0
        share = f"{100 * up / wall:7.0f}%" if up is not None and wall > 0 else f"{'n/a':>8}"
        lines.append(f"{s:<12}{wall:9.1f}{(f'{up:12.1f}' if up is not None else f'{chr(32) * 9}n/a')}{share}")
    totals = [r["total"] for r in runs]
    median = statistics.median(totals)
    lines.append(
        f"{'total':<12}{median:9.1f}{startup_total:12.1f}{100 * startup_total / median:7.0f}%   "
        f"= {fmt_min(median)}; runs: {', '.join(fmt_min(t) for t in totals)}"
    )
    lines.append(
        f"before the first stage (make, dvc start-up): {statistics.median(r['before_first_stage'] for r in runs):.1f} s"
    )
    for r in runs:
        ev = r["metrics"].get("eval") or {}
        lines.append(
            f"  run {r['commit'][:10]}: fid {ev.get('fid')}, class consistency "
            f"{ev.get('class_consistency')}, train img/s {(r['metrics'].get('train') or {}).get('img_per_s')}"
        )
    return "\n".join(lines)


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed benchmark still removes its clone
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", action="append", help="revision(s) to time (repeatable; default HEAD)")
    ap.add_argument("--runs", type=int, default=1, help="fresh clones per revision; the table shows medians")
    ap.add_argument("--venv", type=Path, default=Path(sys.prefix), help="an installed venv (default: this one)")
    ap.add_argument("--how", choices=["make", "dvc"], default="make", help="`make repro` (default) or `dvc repro`")
    ap.add_argument("--json", type=Path, default=None, help="also write every run's figures here")
    ap.add_argument("--keep", action="store_true", help="keep the clones (their reports/timings/) for inspection")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param in the clone (smoke runs only: then it is not the default's time)",
    )
    args = ap.parse_args()
    revs = args.rev or ["HEAD"]
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    if not (args.venv / "bin" / "dvc").exists():
        ap.error(f"{args.venv} has no bin/dvc: pass --venv of an installed environment (make venv)")
    results: dict[str, list[dict]] = {rev: [] for rev in revs}
    for i in range(args.runs):  # interleaved, so that a noisy minute does not land on one revision only
        for rev in revs:
            print(f"run {i + 1}/{args.runs} of {rev}", file=sys.stderr, flush=True)
            results[rev].append(one_run(rev, args.venv.resolve(), args.how, args.keep, args.set))
    for rev in revs:
        print(summarise(results[rev]))
        print()
    if len(revs) > 1:
        base = statistics.median(r["total"] for r in results[revs[0]])
        for rev in revs[1:]:
            t = statistics.median(r["total"] for r in results[rev])
            print(f"{rev} vs {revs[0]}: {t:.1f} s vs {base:.1f} s ({t - base:+.1f} s, {t / base:.3f}x)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
