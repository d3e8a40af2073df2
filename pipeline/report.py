"""`python -m pipeline.report`: the sweep's curves as the paper's figures and a table in docs/results.md.

Collect. `dvc exp show --json` lists the workspace, the baseline commit and its experiments with their params and
metrics (metrics/curve.json: the last point only). Each row's whole curve, every point and its protocol, is the
curve stage's record reports/curve.json, read from the row's git commit (`git show <rev>:reports/curve.json`; the
workspace's from disk). Rows without the metrics, failed or queued experiments and skipped curves (an imported
official checkpoint) are left out.

Compare. FIDs compare only under one protocol (curve samples, sampler, guidance, reference statistics, training
steps): the largest group of runs sharing one is reported, the others are listed as excluded. The studies come
from the params, not from experiment names:
- conditioning (Fig. 5): runs of one model (e.g. DiT-Ti/4) with two or more train.conditioning values;
- model size (Fig. 6, top): adaLN-Zero runs of one patch size with two or more model sizes;
- patch size (Fig. 6, bottom; Table 4): adaLN-Zero runs of one model size with two or more patch sizes.

Render. docs/results/fid_vs_steps_<study>.png (one panel per fixed model, patch or size), fid_vs_gflops.png
(Fig. 8: final FID against forward Gflops and against parameters, log-log, with Pearson r of each) and
docs/results.md (findings computed from the numbers, the figures, the table, the protocol, the exclusions).

    python -m pipeline.report [--all-commits] [--exp NAME ...] [--out docs/results.md] [--figures docs/results]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from pipeline.artifacts import atomic_write
from pipeline.errors import UserError

CURVE_METRICS = "metrics/curve.json"  # the curve stage's outputs, as dvc.yaml names them: its numbers,
CURVE_REPORT = "reports/curve.json"  # and its record (every point, the model, the protocol)
PARAMS_FILE = "params.yaml"
# The curve.json fields that define a comparable FID: samples and their sampler, guidance, the reference
# statistics and extractor, and the training length of the final point.
PROTOCOL_KEYS = ("num_samples", "sampler", "sampling_steps", "cfg_scale", "cfg_channels", "labels", "sample_seed",
                 "extractor", "extractor_mode", "reference_stats_sha256")


@dataclass(frozen=True)
class Run:
    """One experiment's curve: `curve` is its reports/curve.json."""
    name: str  # the DVC experiment name, "workspace", or the baseline's branch
    rev: str
    curve: dict

    @property
    def model(self) -> str:  # "DiT-S/4"
        return self.curve["model"]

    @property
    def size(self) -> str:  # "DiT-S"
        return self.model.split("/")[0]

    @property
    def patch(self) -> int:
        return self.curve["patch_size"]

    @property
    def conditioning(self) -> str:
        return self.curve["conditioning"]

    def protocol(self) -> tuple:
        p = self.curve["protocol"]
        return tuple((k, p.get(k)) for k in PROTOCOL_KEYS) + (("final_step", self.curve["final_step"]),)


# --- collecting ---------------------------------------------------------------------------------------------------

def exp_show(repo: Path, all_commits: bool) -> list[dict]:
    """`dvc exp show --json`, run with this interpreter's environment (its dvc first on PATH)."""
    cmd = ["dvc", "exp", "show", "--json"] + (["--all-commits"] if all_commits else [])
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed in {repo}:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout)


def table_rows(show: list[dict]) -> list[tuple[str, str, dict]]:
    """(name, rev, data) of every finished row of `dvc exp show --json` (DVC 3.x layout): experiments first, then
    baseline commits, then the workspace, so that a workspace holding an applied experiment dedups to its name."""
    experiments, baselines, workspace = [], [], []
    for row in show:
        if row["rev"] == "workspace":
            workspace.append(("workspace", "workspace", row.get("data")))
            continue
        baselines.append((row.get("name") or row["rev"][:7], row["rev"], row.get("data")))
        for exp in row.get("experiments") or []:
            state = (exp.get("executor") or {}).get("state")
            if state not in (None, "success"):  # queued, running or failed
                continue
            for rev in exp["revs"]:
                if not rev.get("error"):
                    experiments.append((rev.get("name") or rev["rev"][:7], rev["rev"], rev.get("data")))
    return [r for r in experiments + baselines + workspace if r[2] and has_curve(r[2])]


def has_curve(data: dict) -> bool:
    """DVC lists every declared metrics file of a row, with an `error` entry where the commit lacks it."""
    entry = (data.get("metrics") or {}).get(CURVE_METRICS)
    return bool(entry) and "error" not in entry


def read_curve(repo: Path, rev: str) -> dict:
    """reports/curve.json of a commit (or of the workspace): the curve stage's whole record."""
    if rev == "workspace":
        return json.loads((repo / CURVE_REPORT).read_text())
    result = subprocess.run(["git", "show", f"{rev}:{CURVE_REPORT}"], cwd=repo, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"cannot read {CURVE_REPORT} of {rev}: {result.stderr.strip()}")
    return json.loads(result.stdout)


def collect(show: list[dict], load) -> tuple[list[Run], list[tuple[str, str]]]:
    """Runs with a curve, deduplicated, and (name, reason) of each row left out. `load(rev)` reads a curve.json."""
    runs, excluded, seen = [], [], {}
    for name, rev, data in table_rows(show):
        curve = load(rev)
        train = data["params"][PARAMS_FILE]["data"]["train"]
        key = json.dumps(curve, sort_keys=True)
        if not curve["steps"]:
            excluded.append((name, (curve.get("notes") or {}).get("curve", "no checkpoints evaluated")))
        elif (curve["model"], curve["conditioning"]) != (train["model"], train["conditioning"]):
            excluded.append((name, f"stale: its curve is of {curve['model']} {curve['conditioning']}, its params say "
                                   f"{train['model']} {train['conditioning']} (run `dvc repro`)"))
        elif key in seen:
            excluded.append((name, f"same curve as {seen[key]}"))
        else:
            seen[key] = name
            runs.append(Run(name, rev, curve))
    return runs, excluded


def comparable(runs: list[Run]) -> tuple[list[Run], list[tuple[str, str]]]:
    """The largest group of runs under one protocol (first found wins a tie), then one run per (model,
    conditioning); the rest with the reason."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.protocol(), []).append(run)
    best = max(groups.values(), key=len) if groups else []
    excluded = [(r.name, "another protocol: " + ", ".join(f"{k}={v}" for k, v in r.protocol()
                                                           if v != dict(best[0].protocol()).get(k)))
                for r in runs if r not in best]
    kept, variants = [], {}
    for run in best:
        variant = (run.model, run.conditioning)
        if variant in variants:
            excluded.append((run.name, f"a second run of {run.model} {run.conditioning} (kept {variants[variant]})"))
        else:
            variants[variant] = run.name
            kept.append(run)
    return kept, excluded


# --- studies ------------------------------------------------------------------------------------------------------

def studies(runs: list[Run]) -> dict[str, dict[str, list[Run]]]:
    """{study: {panel title: runs}}: each panel varies one factor with the others fixed; panels need >= 2 runs."""
    zero = [r for r in runs if r.conditioning == "adaLN-Zero"]
    by = {
        "conditioning": _panels(runs, lambda r: r.model, lambda r: r.conditioning),
        "size": _panels(zero, lambda r: f"patch {r.patch}", lambda r: r.size),
        "patch": _panels(zero, lambda r: r.size, lambda r: r.patch),
    }
    order = {"conditioning": lambda r: r.curve["final_fid"], "size": lambda r: r.curve["params_M"],
             "patch": lambda r: -r.patch}
    return {s: {t: sorted(rs, key=order[s]) for t, rs in panels.items()} for s, panels in by.items()}


def _panels(runs: list[Run], fixed, varied) -> dict[str, list[Run]]:
    panels: dict[str, list[Run]] = {}
    for run in runs:
        panels.setdefault(fixed(run), []).append(run)
    return {k: v for k, v in sorted(panels.items()) if len({varied(r) for r in v}) >= 2}


def scaling_set(runs: list[Run]) -> list[Run]:
    """The runs of the Gflops analysis (Fig. 8): adaLN-Zero, every size and patch."""
    return [r for r in runs if r.conditioning == "adaLN-Zero"]


# --- findings: each claim checked on the numbers ------------------------------------------------------------------

PAPER_CONDITIONING = "adaLN-Zero"


def pearson_log(x: list[float], y: list[float]) -> float | None:
    """Pearson r of (log x, log y); None with fewer than 3 points or without spread on either side."""
    lx, ly = np.log(np.asarray(x, np.float64)), np.log(np.asarray(y, np.float64))
    if len(lx) < 3 or np.ptp(lx) == 0 or np.ptp(ly) == 0:
        return None
    return float(np.corrcoef(lx, ly)[0, 1])


def _fids(runs: list[Run], label) -> str:
    return ", ".join(f"{label(r)} {r.curve['final_fid']:.2f}" for r in runs)


def check_conditioning(title: str, runs: list[Run]) -> tuple[bool | None, str]:
    """adaLN-Zero has the lowest final FID (runs sorted by final FID); also counted at every common step."""
    text = f"{title}: {_fids(runs, lambda r: r.conditioning)}"
    if PAPER_CONDITIONING not in {r.conditioning for r in runs}:
        return None, text + " (no adaLN-Zero run: not tested)"
    common = sorted(set.intersection(*(set(r.curve["steps"]) for r in runs)))
    wins = sum(min(runs, key=lambda r: r.curve["fid"][r.curve["steps"].index(s)]).conditioning == PAPER_CONDITIONING
               for s in common)
    ok = runs[0].conditioning == PAPER_CONDITIONING
    return ok, text + f"; adaLN-Zero lowest at the final step: {'yes' if ok else 'no'}, and at {wins} of " \
                      f"{len(common)} common checkpoints"


def check_monotone(title: str, runs: list[Run], what: str) -> tuple[bool, str]:
    """Final FID strictly falls along `runs` (ordered by growing model, or shrinking patch)."""
    fids = [r.curve["final_fid"] for r in runs]
    ok = all(a > b for a, b in zip(fids, fids[1:]))
    return ok, f"{title}: {_fids(runs, lambda r: r.model)}; FID falls with every {what}: {'yes' if ok else 'no'}"


def verdict(results: list[bool | None]) -> str:
    tested = [r for r in results if r is not None]
    if not tested:
        return "not tested (no such runs)"
    return "reproduced" if all(tested) else "partly reproduced" if any(tested) else "not reproduced"


def evaluate_claims(runs: list[Run]) -> dict:
    """The paper's three claims checked on the final FIDs: {claim: {"verdict", "lines", ...}}."""
    panels = studies(runs)
    cond = [check_conditioning(t, rs) for t, rs in panels["conditioning"].items()]
    size = [check_monotone(f"model size at {t}", rs, "larger model") for t, rs in panels["size"].items()]
    patch = [check_monotone(f"patch size of {t}", rs, "smaller patch") for t, rs in panels["patch"].items()]
    scaling = scaling_set(runs)
    fid = [r.curve["final_fid"] for r in scaling]
    r_gflops = pearson_log([r.curve["gflops"] for r in scaling], fid)
    r_params = pearson_log([r.curve["params_M"] for r in scaling], fid)
    gflops_ok = None if r_gflops is None else r_gflops < 0 and (r_params is None or abs(r_gflops) > abs(r_params))
    fmt = lambda r: "undefined" if r is None else f"{r:+.3f}"  # noqa: E731
    return {
        "conditioning": {"verdict": verdict([ok for ok, _ in cond]), "lines": [t for _, t in cond]},
        "scaling": {"verdict": verdict([ok for ok, _ in size + patch]), "lines": [t for _, t in size + patch]},
        "gflops": {"verdict": verdict([gflops_ok]), "r_gflops": r_gflops, "r_params": r_params, "lines": [
            f"over {len(scaling)} adaLN-Zero runs: Pearson r(log FID, log Gflops) = {fmt(r_gflops)}, "
            f"r(log FID, log params) = {fmt(r_params)}"]},
    }


# --- figures ------------------------------------------------------------------------------------------------------

STUDY_TITLES = {"conditioning": "FID over training by conditioning (paper Fig. 5)",
                "size": "FID over training by model size at a fixed patch (paper Fig. 6, top)",
                "patch": "FID over training by patch size of a fixed model (paper Fig. 6, bottom)"}
CURVE_LABEL = {"conditioning": lambda r: r.conditioning, "size": lambda r: r.model, "patch": lambda r: r.model}


def save_png(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)  # the Agg canvas: no display, no pyplot state
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def plot_study(study: str, panels: dict[str, list[Run]], path: Path) -> Path:
    fig = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
    for ax, (title, runs) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels.items()):
        for run in runs:
            ax.plot(run.curve["steps"], run.curve["fid"], marker="o", label=CURVE_LABEL[study](run))
        ax.set(title=title, xlabel="training steps", ylabel="FID")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(STUDY_TITLES[study])
    return save_png(fig, path)


def plot_gflops(runs: list[Run], claims: dict, path: Path) -> Path:
    """Final FID against forward Gflops and against parameters (log x), each point named by its model."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    fid = [r.curve["final_fid"] for r in runs]
    for ax, key, name, r in zip(fig.subplots(1, 2), ("gflops", "params_M"), ("Gflops", "params"),
                                (claims["r_gflops"], claims["r_params"])):
        x = [run.curve[key] for run in runs]
        ax.scatter(x, fid)
        for run, xi, yi in zip(runs, x, fid):
            ax.annotate(run.model, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(xscale="log", xlabel="forward Gflops per image" if key == "gflops" else "parameters (M)",
               ylabel="final FID", title=f"Pearson r(log FID, log {name}) = " + _cell(r, 3))
        ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))  # 0.01, 0.02, 0.05, 0.1, ...
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
    fig.suptitle("Final FID against compute and against size (paper Fig. 8), adaLN-Zero runs")
    return save_png(fig, path)


# --- the markdown -------------------------------------------------------------------------------------------------

CLAIMS = {"conditioning": "adaLN-Zero conditioning beats cross-attention, adaLN and in-context (Fig. 5)",
          "scaling": "Bigger models at a fixed patch, and smaller patches at a fixed model, give lower FID "
                     "(Fig. 6, Table 4)",
          "gflops": "FID tracks Gflops better than parameters (Fig. 8)"}


def _cell(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def results_table(runs: list[Run]) -> list[str]:
    steps = sorted({s for r in runs for s in r.curve["steps"]})
    head = ["variant", "model", "conditioning", "patch", "params (M)", "Gflops", "steps", "final FID",
            "class consistency", *(f"FID @ {s}" for s in steps)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(runs, key=lambda r: (r.curve["params_M"], -r.patch, r.conditioning)):
        c = r.curve
        at = dict(zip(c["steps"], c["fid"]))
        cells = [r.name, r.model, r.conditioning, r.patch, _cell(c["params_M"]), _cell(c["gflops"], 3),
                 c["final_step"], _cell(c["final_fid"]), _cell(c["final_class_consistency"], 3),
                 *(_cell(at.get(s)) for s in steps)]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def markdown(runs: list[Run], excluded: list[tuple[str, str]], claims: dict, figures: list[Path],
             out: Path) -> str:
    p = runs[0].curve["protocol"]
    lines = ["# Results: the DiT paper's findings at small scale", "",
             f"Generated by `python -m pipeline.report` from {len(runs)} runs ({', '.join(r.name for r in runs)}). "
             f"Each point is the FID of {p['num_samples']} samples of a kept checkpoint's EMA ({p['sampler']}, "
             f"{p['sampling_steps']} steps, cfg {p['cfg_scale']}) against {p['reference_count']} real images, in the "
             f"{p['feature_dim']}-d features of the {p['extractor']} extractor (the curve stage). FIDs of few samples "
             "are biased upward: compare them with one another, not with the paper's FID-50K.", "", "## Findings", ""]
    for i, (key, claim) in enumerate(CLAIMS.items(), 1):
        lines.append(f"{i}. **{claim}: {claims[key]['verdict']}.**")
        lines += [f"   - {line}" for line in claims[key]["lines"]]
    lines += ["", "## Figures", ""]
    lines += [f"![{f.stem}]({os.path.relpath(f, out.parent)})" for f in figures]
    lines += ["", "## Runs", "", *results_table(runs), ""]
    if excluded:
        lines += ["## Left out", "", *(f"- `{name}`: {why}" for name, why in excluded), ""]
    return "\n".join(lines)


def render(runs: list[Run], excluded: list[tuple[str, str]], out: Path, fig_dir: Path) -> dict:
    """Figures, findings and docs/results.md for `runs` (any list of records: tests feed constructed ones)."""
    runs, more = comparable(runs)
    excluded = excluded + more
    claims = evaluate_claims(runs)
    figures = [plot_study(study, panels, Path(fig_dir) / f"fid_vs_steps_{study}.png")
               for study, panels in studies(runs).items() if panels]
    scaling = scaling_set(runs)
    if scaling:
        figures.append(plot_gflops(scaling, claims["gflops"], Path(fig_dir) / "fid_vs_gflops.png"))
    text = markdown(runs, excluded, claims, figures, Path(out))
    atomic_write(out, lambda tmp: tmp.write_text(text))
    summary = [f"{CLAIMS[k]}: {v['verdict']}" for k, v in claims.items()]
    return {"claims": claims, "figures": figures, "runs": [r.name for r in runs], "excluded": excluded,
            "summary": summary}


# --- the command --------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=Path("."), help="the DVC repository")
    ap.add_argument("--all-commits", action="store_true", help="also experiments of older baseline commits")
    ap.add_argument("--exp", nargs="+", help="only these experiment names (default: every row with a curve)")
    ap.add_argument("--out", type=Path, default=Path("docs/results.md"))
    ap.add_argument("--figures", type=Path, default=Path("docs/results"), help="directory of the PNG figures")
    args = ap.parse_args(argv)
    show = exp_show(args.repo, args.all_commits)
    runs, excluded = collect(show, lambda rev: read_curve(args.repo, rev))
    if args.exp:
        runs = [r for r in runs if r.name in args.exp]
        excluded = [(name, why) for name, why in excluded if name in args.exp]
        missing = sorted(set(args.exp) - {r.name for r in runs} - {name for name, _ in excluded})
        if missing:
            raise UserError(f"no finished curve for {missing}; `dvc exp show` lists the experiments")
    if not runs:
        raise UserError(f"no experiment has a {CURVE_METRICS} with points: run the sweep (sweeps/offline.sh) "
                         "or `dvc repro curve` first")
    result = render(runs, excluded, args.out, args.figures)
    print(f"wrote {args.out} and {len(result['figures'])} figures in {args.figures}")
    for line in result["summary"]:
        print(line)
    return result


if __name__ == "__main__":
    from pipeline.errors import run_main

    run_main(main)
