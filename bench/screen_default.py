"""Screen changes to the offline default, one seed each, as the pipeline itself runs them.

Each arm of sweeps/default-screen.yaml is params.yaml with a few keys changed. An arm runs `dvc repro evaluate` in
this checkout under one local Ray (as `make repro` does; DVC's run cache restores the stages whose params and code
did not change), then its figures go to docs/bench/default-screen/<arm>.json, written atomically, and params.yaml is
put back. An arm with a record is done: a killed or timed-out invocation resumes with the next arm, in this session
or a later one, so commit the records as they come.

    python bench/screen_default.py list              # the arms and which have records
    python bench/screen_default.py run [ARM ...]     # run the arms without records (all, or the ones named)
    python bench/screen_default.py table             # the records as a Markdown table
    python bench/screen_default.py --plan sweeps/default-final.yaml run   # another plan: records in
                                                     # docs/bench/<the plan's file name>/

FID and class consistency depend only on the params, the code and the CPU's kernels, not on the machine's load, so
arms compare wherever they ran on one machine type. Seconds do depend on the load: each record keeps the 2048^2 fp32
matmul GFLOP/s and the load average beside them, and a time budget is judged in a quiet run, not from these.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.artifacts import atomic_write, atomic_write_json  # noqa: E402


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


PLAN = ROOT / "sweeps" / "default-screen.yaml"
RECORDS = ROOT / "docs" / "bench"  # a plan's records go to RECORDS/<plan file's stem>/


def data_params(data: str) -> dict:
    """What an arm's `data` sets, on top of its own keys: nothing for `synthetic`; for an image folder of
    bench/other_shapes.py (`other-shapes`, `other-shapes-d<t>`, `other-shapes-d<t>-s<seed>`), its folder under
    inputs/."""
    if data == "synthetic":
        return {}
    shapes_args(data)  # a name it cannot read is an error here, before any run
    return {"ingest.source": "imagefolder", "ingest.imagefolder.root": f"inputs/{data}"}


def shapes_args(data: str) -> list[str]:
    """bench/other_shapes.py's options for a data name: `other-shapes` is the first version (difficulty 1, draw
    seed 0), `other-shapes-d<t>` sets the difficulty, and `-s<seed>` the seed of the draws (0 unless named), so
    a set with the calibrated difficulty and draws that no tuning has seen is `other-shapes-d0.25-s1`."""
    match = re.fullmatch(r"other-shapes(?:-d([0-9.]+))?(?:-s([0-9]+))?", data)
    if not match:
        raise SystemExit(
            f"unknown data {data!r}: synthetic, other-shapes, other-shapes-d<difficulty> or "
            "other-shapes-d<difficulty>-s<seed>"
        )
    difficulty, seed = match.group(1) or "1", match.group(2) or "0"
    return ["--difficulty", difficulty, "--seed", seed]


def write_data(data: str) -> None:
    """The image folder of `data` under inputs/, unless it is there."""
    if data == "synthetic" or (ROOT / "inputs" / data).exists():
        return
    script = str(ROOT / "bench" / "other_shapes.py")
    subprocess.run([sys.executable, script, f"inputs/{data}", *shapes_args(data)], cwd=ROOT, check=True)


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def set_key(params: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    node = params
    for key in path:
        node = node[key]
    if last not in node:
        raise SystemExit(f"{dotted} is not a key of params.yaml")
    node[last] = value


def arm_params(base: dict, arm: dict) -> dict:
    params = json.loads(json.dumps(base))  # a deep copy
    for key, value in {**data_params(arm.get("data", "synthetic")), **arm.get("set", {})}.items():
        set_key(params, key, value)
    return params


def base_params_text() -> str:
    """params.yaml as committed: a screen killed inside an arm leaves that arm's params.yaml behind."""
    out = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=ROOT, capture_output=True, text=True, check=True)
    if (ROOT / "params.yaml").read_text() != out.stdout:
        print("params.yaml differs from HEAD's: running the arms on HEAD's (a screen killed inside an arm?)")
    return out.stdout


def read_json(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


def training_loss(log: Path) -> dict:
    """The logged training loss (a mean over each `log_every` window): at the end, its lowest, and its highest after
    the first tenth of the run with the step and the window's grad norm there. A run that diverged shows as a late
    maximum far above the lowest (a window whose learned-variance term exploded, and the loss that stays high)."""
    with log.open() as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    late = [r for r in rows if r["step"] > rows[-1]["step"] / 10]
    peak = max(late, key=lambda r: r["loss"])
    return {
        "final": rows[-1]["loss"],
        "min": min(r["loss"] for r in rows),
        "max_late": peak["loss"],
        "max_late_step": int(peak["step"]),
        "grad_norm_at_max_late": peak["grad_norm"],
    }


def run_arm(name: str, arm: dict, base_text: str) -> dict:
    write_data(arm.get("data", "synthetic"))
    gflops = matmul_gflops()
    write_text(ROOT / "params.yaml", yaml.safe_dump(arm_params(yaml.safe_load(base_text), arm), sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.setdefault("RAY_AUTH_MODE", "token")
    cmd = [sys.executable, "-m", "pipeline.cluster", "run", "--", "dvc", "repro", "evaluate"]
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    finally:
        write_text(ROOT / "params.yaml", base_text)
    wall = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(f"arm {name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    ran = [line.split("'")[1] for line in out.stdout.splitlines() if line.startswith("Running stage")]
    ev, train = read_json("metrics/eval.json"), read_json("metrics/train.json")
    loss = training_loss(ROOT / "plots" / "train.csv")
    sample, vae = read_json("metrics/sample.json"), read_json("metrics/vae.json")
    return {
        "arm": name,
        "data": arm.get("data", "synthetic"),
        "set": arm.get("set", {}),
        "why": arm.get("why", ""),
        "fid": ev["fid"],
        "class_consistency": ev["class_consistency"],
        "precision": ev.get("precision"),
        "recall": ev.get("recall"),
        "vae_psnr_db": vae["psnr_db"],
        "train_loss": loss,
        "train_s": train.get("seconds"),
        "train_img_per_s": train.get("img_per_s"),
        "sample_s": sample.get("seconds"),
        "repro_s": round(wall, 1),
        "stages_run": ran,
        "matmul_gflops": round(gflops, 1),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["list", "run", "table"])
    ap.add_argument("arms", nargs="*")
    ap.add_argument("--plan", type=Path, default=PLAN, help="the arms' YAML (default: %(default)s)")
    args = ap.parse_args()
    plan_path = args.plan.resolve()
    records = RECORDS / plan_path.stem
    plan = yaml.safe_load(plan_path.read_text())["arms"]
    unknown = set(args.arms) - set(plan)
    if unknown:
        raise SystemExit(f"no such arm: {sorted(unknown)}; the plan has {sorted(plan)}")
    names = args.arms or list(plan)
    if args.command == "list":
        for name in names:
            print(f"{'done' if (records / f'{name}.json').exists() else 'todo'}  {name}  {plan[name].get('set', {})}")
    elif args.command == "run":
        base_text = base_params_text()
        while True:  # the plan is read again before each arm: arms added while a screen runs join it
            plan = yaml.safe_load(plan_path.read_text())["arms"]
            todo = [n for n in (args.arms or plan) if n in plan and not (records / f"{n}.json").exists()]
            if not todo:
                break
            name = todo[0]
            print(f"arm {name}: {plan[name].get('set', {})}", flush=True)
            record = run_arm(name, plan[name], base_text)
            atomic_write_json(records / f"{name}.json", record)
            print(json.dumps(record), flush=True)
    else:
        cols = ["arm", "data", "fid", "class_consistency", "train_s", "sample_s", "repro_s", "matmul_gflops"]
        print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        for name in names:
            path = records / f"{name}.json"
            if path.exists():
                r = json.loads(path.read_text())
                cells = [f"{r[c]:.3f}" if isinstance(r[c], float) and c == "class_consistency" else r[c] for c in cols]
                print("| " + " | ".join(f"{c:.1f}" if isinstance(c, float) else str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
