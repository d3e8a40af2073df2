"""The decision rule of docs/offline-default.md, applied to the final comparison's records, point by point.

    python bench/default_verdict.py            # docs/bench/default-final/*.json (+ wall_time.json when measured)

Reads the records that `bench/screen_default.py --plan sweeps/default-final.yaml run` writes (arms `old-s<seed>`,
`new-s<seed>`, `old-shapes-s<seed>`, `new-shapes-s<seed>`) and the `--json` output of `bench/wall_time.py --rev
OLD --rev NEW` (the first revision is the old default). Prints every run, the medians and spreads, each point of
the rule with its numbers, and the verdict. A point without its records is "not measured": the candidate does not
become the default on a partial comparison, but one failed point is enough to keep the default.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "docs" / "bench" / "default-final"
SEEDS = (0, 1, 2)

# The rule, as docs/offline-default.md writes it (fixed before the final runs).
MAX_MEDIAN_FID = 28.0
MIN_MEDIAN_CLASS_CONSISTENCY = 0.75
MAX_FID_STD = 2.0
MIN_SHAPES_CLASS_CONSISTENCY = 0.60
MAX_WALL_RATIO = 1.03
# Point 5, added after the first Ti/4 comparison, where one held-out training diverged while the median of point 3
# hid it: a candidate's run whose logged loss, after the first tenth of its steps, rises above this multiple of its
# lowest has diverged (the healthy runs of that comparison peaked at 1.6-1.9x their lowest, just after the first tenth).
MAX_LATE_LOSS_RATIO = 10.0


def load(records: Path, version: str, data: str) -> list[dict] | None:
    """The records of one version on one data set (`synthetic`, or `shapes`: the held-out set, at the difficulty
    the plan names), seeds 0-2; None when any is missing."""
    tag = "" if data == "synthetic" else "-shapes"
    paths = [records / f"{version}{tag}-s{seed}.json" for seed in SEEDS]
    if not all(p.exists() for p in paths):
        return None
    runs = [json.loads(p.read_text()) for p in paths]
    kinds = {run["data"] for run in runs}
    held_out = len(kinds) == 1 and all(k.startswith("other-shapes") for k in kinds)
    expected = kinds == {"synthetic"} if data == "synthetic" else held_out
    if not expected:
        raise SystemExit(f"{version} ({data}): the records name data {sorted(kinds)}: not this plan's arms")
    return runs


def summary(runs: list[dict]) -> dict:
    fid = [r["fid"] for r in runs]
    cc = [r["class_consistency"] for r in runs]
    return {
        "fid": fid,
        "cc": cc,
        "fid_median": statistics.median(fid),
        "fid_std": statistics.stdev(fid),
        "cc_median": statistics.median(cc),
        "gflops": sorted({r["matmul_gflops"] for r in runs}),
        "commits": sorted({r["commit"] for r in runs}),
    }


def wall_ratio(path: Path) -> tuple[float, float, float] | None:
    """(old median s, new median s, new / old) of a `bench/wall_time.py --rev OLD --rev NEW --json` file."""
    if not path.exists():
        return None
    results = json.loads(path.read_text())
    if len(results) != 2:
        raise SystemExit(f"{path}: expected two revisions (old, new), found {list(results)}")
    old, new = (statistics.median(r["total"] for r in runs) for runs in results.values())
    return old, new, new / old


def candidate_runs(records: Path) -> list[dict]:
    """Every record of the candidate so far, complete or not: one diverged run fails point 5 before the rest run."""
    paths = sorted(records.glob("new-s[0-9].json")) + sorted(records.glob("new-shapes-s[0-9].json"))
    return [json.loads(p.read_text()) for p in paths]


def divergence(runs: list[dict], complete: bool) -> tuple[str, bool | None, str]:
    """Point 5 over the candidate's runs (`train_loss`, as bench/screen_default.py records it): failed when any run
    diverged, not measured while a run (`complete` is False) or its loss record is missing."""
    name = "5. no diverged training"
    diverged = [
        f"{r['arm']} (loss {r['train_loss']['max_late']:.3g} at step {r['train_loss']['max_late_step']}, "
        f"lowest {r['train_loss']['min']:.3g})"
        for r in runs
        if "train_loss" in r and r["train_loss"]["max_late"] > MAX_LATE_LOSS_RATIO * r["train_loss"]["min"]
    ]
    if diverged:
        return name, False, "diverged: " + "; ".join(diverged)
    if not complete or any("train_loss" not in r for r in runs):
        return name, None, ""
    return name, True, f"every late loss within {MAX_LATE_LOSS_RATIO:g}x of its run's lowest"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=Path, default=RECORDS)
    args = ap.parse_args()

    groups = {(v, d): load(args.records, v, d) for v in ("old", "new") for d in ("synthetic", "shapes")}
    print("| version | data | FID per seed 0, 1, 2 | median | std | class consistency per seed | median |")
    print("|---|---|---|---|---|---|---|")
    stats = {}
    for (version, data), runs in groups.items():
        if runs is None:
            tag = "" if data == "synthetic" else "-shapes"
            present = [json.loads(p.read_text()) for p in sorted(args.records.glob(f"{version}{tag}-s[0-9].json"))]
            fid = ", ".join(f"{r['arm'].rsplit('-', 1)[1]}: {r['fid']:.2f}" for r in present) or "not measured"
            cc = ", ".join(f"{r['arm'].rsplit('-', 1)[1]}: {r['class_consistency']:.3f}" for r in present)
            print(f"| {version} | {data} | {fid} | | | {cc} | |")
            continue
        s = stats[version, data] = summary(runs)
        print(
            f"| {version} | {runs[0]['data']} | {', '.join(f'{x:.2f}' for x in s['fid'])} | {s['fid_median']:.2f} "
            f"| {s['fid_std']:.2f} | {', '.join(f'{x:.3f}' for x in s['cc'])} | {s['cc_median']:.3f} |"
        )
    gflops = sorted({g for s in stats.values() for g in s["gflops"]})
    if gflops:
        print(f"\n2048^2 fp32 matmul: {gflops[0]}-{gflops[-1]} GFLOP/s over the runs")

    points: list[tuple[str, bool | None, str]] = []
    new = stats.get(("new", "synthetic"))
    if new:
        ok = new["fid_median"] <= MAX_MEDIAN_FID and new["cc_median"] >= MIN_MEDIAN_CLASS_CONSISTENCY
        text = f"median FID {new['fid_median']:.2f} (<= {MAX_MEDIAN_FID}), class consistency {new['cc_median']:.3f}"
        points.append(("1. quality on the offline data", ok, f"{text} (>= {MIN_MEDIAN_CLASS_CONSISTENCY})"))
        ok = new["fid_std"] <= MAX_FID_STD
        points.append(("2. stability", ok, f"FID std {new['fid_std']:.2f} (<= {MAX_FID_STD})"))
    else:
        points += [("1. quality on the offline data", None, ""), ("2. stability", None, "")]
    new_shapes, old_shapes = stats.get(("new", "shapes")), stats.get(("old", "shapes"))
    if new_shapes and old_shapes:
        a, b = new_shapes["cc_median"], old_shapes["cc_median"]
        ok = a >= MIN_SHAPES_CLASS_CONSISTENCY and a >= b
        points.append(("3. held-out shapes", ok, f"class consistency {a:.3f} (>= 0.60 and >= the old's {b:.3f})"))
    else:
        points.append(("3. held-out shapes", None, ""))
    wall = wall_ratio(args.records / "wall_time.json")
    if wall:
        old_s, new_s, ratio = wall
        text = f"make repro median {new_s:.0f} s vs {old_s:.0f} s: {ratio:.3f}x (<= {MAX_WALL_RATIO})"
        points.append(("4. time", ratio <= MAX_WALL_RATIO, text))
    else:
        points.append(("4. time", None, ""))
    complete = all(groups["new", d] is not None for d in ("synthetic", "shapes"))
    points.append(divergence(candidate_runs(args.records), complete))

    print()
    for name, ok, text in points:
        print(f"{name}: {'not measured' if ok is None else ('pass' if ok else 'FAIL')}  {text}".rstrip())
    # A failed point decides alone: the parts still missing could not make the candidate pass.
    if any(ok is False for _, ok, _ in points):
        print("\nverdict: the default stays (a point failed)")
    elif any(ok is None for _, ok, _ in points):
        print("\nverdict: none yet (the comparison is incomplete)")
    else:
        print("\nverdict: the candidate becomes the default")


if __name__ == "__main__":
    main()
