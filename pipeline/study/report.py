"""`python -m pipeline.study.report`: docs/results.md and its figures, from the sweep's records alone.

The records are docs/results/runs/<name>.json, one per finished run, written by `python -m pipeline.study.sweep` and
committed; the plan (sweeps/study-plan.yaml) says which runs there should be. A fresh clone re-renders the report
with this one command, without DVC experiments or rerunning anything. Runs of the plan without a record are listed
as not yet run, and a claim whose runs are not all in is pending (pipeline.study.verdicts has the rule).

    python -m pipeline.study.report [--runs docs/results/runs] [--out docs/results.md] [--figures docs/results]
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import pipeline.study.verdicts as V
from pipeline.artifacts import atomic_write
from pipeline.errors import UserError, run_main
from pipeline.study.plan import PLAN_FILE, expand, load_plan

RUNS_DIR = Path("docs/results/runs")


@dataclass(frozen=True)
class Claim:
    number: int
    title: str
    tag: str  # the study tag whose planned runs it needs
    verdict: str
    lines: list


def load_records(runs_dir: Path) -> list[dict]:
    records = []
    for path in sorted(runs_dir.glob("*.json")):
        rec = json.loads(path.read_text())
        if rec.get("name") != path.stem or "eval" not in rec:
            raise UserError(f"{path}: not a sweep record (written by `python -m pipeline.study.sweep`)")
        records.append(rec)
    return records


def complete(plan: dict, records: list[dict], tag: str) -> bool:
    have = {r["name"] for r in records}
    return all(r.name in have for r in expand(plan) if tag in r.studies)


# --- the claims ---------------------------------------------------------------------------------------------------


def claims(records: list[dict], plan: dict) -> list[Claim]:
    st = plan["studies"]
    cond = V.conditioning_pairs(records, st["conditioning"])
    size = V.ordering_pairs(records, st["size"]["models"])
    patch = V.ordering_pairs(records, st["patch"]["models"])
    gpair, corr = V.gflops_pair(records, plan["seeds"])
    compute = V.compute_pairs(records, st["size"]["models"])
    samp = V.sampling_pairs(records, st["sampling"])
    guid = V.guidance_pairs(records, st["guidance"])

    def lines(pairs, study):  # a verdict per pair once its study is complete; until then how it stands
        partial = not complete(plan, records, study)
        return [p.line(partial) for p in pairs if p.seeds]

    c = corr["all"]
    n_zero = sum(1 for r in V.training(records) if r["conditioning"] == V.REFERENCE)
    corr_lines = (
        [
            f"over every adaLN-Zero run (n={n_zero}, per-seed points): "
            f"Pearson r(log FID, log Gflops) = {c['pearson_gflops']:+.3f}, "
            f"r(log FID, log params) = {c['pearson_params_M']:+.3f}; Spearman {c['spearman_gflops']:+.3f} "
            f"vs {c['spearman_params_M']:+.3f}"
        ]
        if c
        else []
    )
    claims = [  # (number, claim, figure's study, pairs the rule judges, the plan's study that must be complete, lines)
        (
            1,
            "adaLN-Zero beats adaLN, cross-attention and in-context conditioning (Fig. 5)",
            "conditioning",
            cond,
            "conditioning",
            lines(cond, "conditioning"),
        ),
        (
            2,
            "a deeper, wider DiT gives lower FID at a fixed patch (Fig. 6, Table 4)",
            "size",
            size,
            "size",
            lines(size, "size"),
        ),
        (
            3,
            "a smaller patch gives lower FID at a fixed model (Fig. 6)",
            "patch",
            patch,
            "patch",
            lines(patch, "patch"),
        ),
        (
            4,
            "FID tracks forward Gflops better than parameters (Fig. 8)",
            "gflops",
            [gpair],
            "gflops",
            corr_lines + lines([gpair], "gflops"),
        ),
        (
            5,
            "larger models reach a given FID with less training compute (Fig. 9)",
            "size",
            compute,
            "size",
            lines(compute, "size"),
        ),
        (
            6,
            "more sampling steps do not make a smaller model match a larger one (Fig. 10)",
            "sampling",
            samp,
            "sampling",
            lines(samp, "sampling"),
        ),
        (
            7,
            "guidance: cfg 1.5 lowers FID and class consistency rises with cfg (Table 2, Fig. 1)",
            "guidance",
            guid,
            "guidance",
            lines(guid, "guidance"),
        ),
    ]
    return [
        Claim(number, text, study, V.verdict(pairs, complete(plan, records, planned)), shown)
        for number, text, study, pairs, planned, shown in claims
    ]


# --- figures ------------------------------------------------------------------------------------------------------


def save_png(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)  # the Agg canvas: no display, no pyplot state
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def mean_std(values) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def curve_by_step(runs: list[dict], x=lambda r, s: s) -> tuple[list, list, list]:
    """Mean and std over seeds of the curve FID at each step (x of the first run at that step)."""
    steps = sorted(set.intersection(*(set(r["curve"]["steps"]) for r in runs)))
    xs, ms, ss = [], [], []
    for s in steps:
        m, sd = mean_std([r["curve"]["fid"][r["curve"]["steps"].index(s)] for r in runs])
        xs.append(x(runs[0], s)), ms.append(m), ss.append(sd)
    return xs, ms, ss


def plot_curves(
    panels: dict[str, list[dict]],
    path: Path,
    title: str,
    x=lambda r, s: s,
    xlabel: str = "training steps",
    logx: bool = False,
) -> Path | None:
    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        return None
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    for label, runs in panels.items():
        xs, ms, ss = curve_by_step(runs, x)
        ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=f"{label} (n={len(runs)})")
    ax.set(title=title, xlabel=xlabel, ylabel="FID (curve stage, 200 samples, cfg 1.0)")
    if logx:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def plot_gflops(records: list[dict], path: Path, corr: dict) -> Path | None:
    zero = [r for r in V.training(records) if r["conditioning"] == V.REFERENCE]
    if not zero:
        return None
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    for ax, key, label in zip(fig.subplots(1, 2), ("gflops", "params_M"), ("forward Gflops", "parameters (M)")):
        for model in sorted({r["model"] for r in zero}):
            runs = [r for r in zero if r["model"] == model]
            m, sd = mean_std([V.final_fid(r) for r in runs])
            ax.errorbar([runs[0][key]], [m], yerr=[sd], marker="o", capsize=3, label=f"{model} (n={len(runs)})")
        r = corr.get(f"pearson_{key}")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel=label,
            ylabel="final FID (1,000 samples, cfg 1.0)",
            title=f"Pearson r(log FID, log x) = {r:+.3f}" if r is not None else "r: too few runs",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_png(fig, path)


def plot_sampling(records: list[dict], study: dict, path: Path) -> Path | None:
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    drawn = False
    for model in study["models"]:
        pts = {}
        for r in records:
            if "sampling" in r["studies"] and r["model"] == model:
                pts.setdefault(r["params"]["sample"]["steps"], []).append(V.final_fid(r))
        if pts:
            gflops = next(r["gflops"] for r in records if r["model"] == model)
            steps = sorted(pts)
            ms = [mean_std(pts[s]) for s in steps]
            ax.errorbar(
                [gflops * s for s in steps],
                [m for m, _ in ms],
                yerr=[sd for _, sd in ms],
                marker="o",
                capsize=3,
                label=model,
            )
            drawn = True
    if not drawn:
        return None
    ax.set(
        xscale="log",
        xlabel="sampling Gflops per image (forward Gflops x steps)",
        ylabel=f"FID ({study['num_fid_samples']} samples, {study['sampler']})",
        title="FID vs sampling compute (paper Fig. 10)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def plot_guidance(records: list[dict], study: dict, path: Path) -> Path | None:
    pts = V.guidance_points(records, study)
    pts = {c: v for c, v in pts.items() if v}
    if not pts:
        return None
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    for ax, (key, label) in zip(fig.subplots(1, 2), (("fid", "FID"), ("class_consistency", "class consistency"))):
        ms = [mean_std([r["eval"][key] for r in v.values()]) for v in pts.values()]
        ax.errorbar(list(pts), [m for m, _ in ms], yerr=[sd for _, sd in ms], marker="o", capsize=3)
        ax.set(xlabel="cfg scale", ylabel=label, title=f"{study['model']} adaLN-Zero: {label} vs guidance")
        ax.grid(alpha=0.3)
    return save_png(fig, path)


def figures(records: list[dict], plan: dict, out: Path, corr: dict) -> list[Path]:
    st = plan["studies"]
    ti = st["conditioning"]["model"]
    made = [
        plot_curves(
            {c: V.variant(records, ti, c) for c in st["conditioning"]["conditionings"]},
            out / "fid_vs_steps_conditioning.png",
            f"{ti}: FID over training by conditioning (Fig. 5)",
        ),
        plot_curves(
            {m: V.variant(records, m) for m in st["size"]["models"]},
            out / "fid_vs_steps_size.png",
            "FID over training by model size (Fig. 6)",
        ),
        plot_curves(
            {m: V.variant(records, m) for m in st["patch"]["models"]},
            out / "fid_vs_steps_patch.png",
            "FID over training by patch size (Fig. 6)",
        ),
        plot_gflops(records, out / "fid_vs_gflops.png", corr),
        plot_curves(
            {m: V.variant(records, m) for m in st["size"]["models"]},
            out / "fid_vs_training_compute.png",
            "FID vs training compute (Fig. 9)",
            x=V.training_compute,
            xlabel="training Gflop (forward Gflops x batch x steps x 3)",
            logx=True,
        ),
        plot_sampling(records, st["sampling"], out / "fid_vs_sampling_compute.png"),
        plot_guidance(records, st["guidance"], out / "guidance.png"),
    ]
    return [p for p in made if p is not None]


# --- markdown -----------------------------------------------------------------------------------------------------


def run_row(r: dict) -> str:
    s, e = r["params"]["sample"], r["eval"]
    curve = f"{r['curve']['fid'][-1]:.2f}" if r.get("curve") else ""
    wall = r["wall_s"].get("experiment")
    return (
        f"| {r['name']} | {r['model']} | {r['conditioning']} | {r['seed']} | {s['sampler']} {s['steps']} | "
        f"{s['cfg_scale']:g} | {s['num_fid_samples']} | {e['fid']:.2f} | {e['class_consistency']:.3f} | {curve} | "
        f"{r['gflops']:.4f} | {r['params_M']:.2f} | {seconds(r['wall_s'].get('train'))} | {seconds(wall)} |"
    )


def seconds(value) -> str:
    """Whole seconds; blank when not measured (a run recorded by `sweep collect` has no experiment wall time)."""
    return "" if value is None or math.isnan(value) else f"{value:.0f}"


def cpu_of(r: dict) -> str:
    return (r.get("machine") or {}).get("cpu", "machine not recorded")


def machines_line(records: list[dict]) -> str:
    cpus = Counter(cpu_of(r) for r in records)
    return ", ".join(f"{cpu} ({n})" for cpu, n in sorted(cpus.items()))


def render(records: list[dict], plan: dict, out_md: Path, fig_dir: Path) -> Path:
    planned = expand(plan)
    names = {r.name for r in planned}
    extra = sorted(r["name"] for r in records if r["name"] not in names)
    records, other, ref_key = V.one_reference([r for r in records if r["name"] in names])
    have = {r["name"] for r in records}
    missing = [r.name for r in planned if r.name not in have]
    commits = sorted({r["plan"]["commit"] for r in records})
    found = claims(records, plan)
    _, corr = V.gflops_pair(records, plan["seeds"])
    figs = figures(records, plan, fig_dir, corr["all"])
    rg = V.regime(records, plan)
    md = [
        "# Results: the DiT paper's findings at small scale",
        "",
        f"Generated by `python -m pipeline.study.report` from {len(records)} of the {len(planned)} runs "
        f"of the study plan "
        f"([docs/study-plan.md](study-plan.md), `sweeps/study-plan.yaml`, plan `{plan['name']}`), "
        f"recorded in `docs/results/runs/`. "
        + (
            "Plan commit(s) of the records: " + ", ".join(f"`{c[:12]}`" for c in commits) + "."
            if commits
            else "No run has been recorded yet: **pending: sweep not yet run**."
        ),
        "",
    ]
    if records:
        md += [
            f"Reference statistics of the pooled runs: `{(ref_key or 'not recorded')[:8]}`; machines: "
            f"{machines_line(records)}.",
            "",
        ]
    if other:
        md += [
            "**Measured against another reference** (not pooled, and counted below as not yet run: each "
            "experiment trains its own VAE, latents and reference classifier, and a CPU with other kernels trains "
            "other weights from the same seed, so these FIDs are on another scale; rerun them where the pooled "
            "runs ran, or move the study):",
            "",
        ]
        md += [f"- {r['name']} ({(V.reference_of(r) or 'none')[:8]}, {cpu_of(r)})" for r in other] + [""]
    if len(commits) > 1:
        md += [
            "**Warning**: the records come from more than one plan commit; rerun the studies the change touched.",
            "",
        ]
    if missing:
        md += [
            f"**Partial sweep**: {len(missing)} planned runs are not yet run; verdicts of studies with missing "
            "runs are *pending*.",
            "",
        ]
    md += [
        "Decision rule (from the plan): a pair (A expected to beat B) is **reproduced** when the ordering holds in "
        "every seed, or when the mean gap in the expected direction exceeds twice the pooled std (sqrt of the "
        "mean of the two sample variances, ddof 1); **not reproduced** otherwise. Orderings of 3+ variants apply "
        "the rule to each adjacent pair, and the claim needs every pair. Values are mean ± std over seeds (n "
        "seeds). FIDs are in the offline classifier's features (1,000 samples, DPM-Solver++ 20 steps, cfg 1.0 "
        "unless said): compare them within this sweep only.",
        "",
        "Learning regime: DiT-Ti/2 adaLN-Zero at cfg 1.5 must reach class consistency "
        f">= {rg['bar']} at 3,000 steps in every seed: "
        + (
            "met"
            if rg["met"]
            else "**not met**: the models do not yet condition on the class"
            if rg["met"] is False
            else "pending"
        )
        + (
            " (cc by seed: " + ", ".join(f"{s}: {v:.3f}" for s, v in sorted(rg["cc"].items())) + ")."
            if rg["cc"]
            else "."
        ),
        "",
        "## Findings",
        "",
    ]
    for c in found:
        md += [f"### {c.number}. {c.title}: {c.verdict}", ""]
        md += [f"- {line}" for line in c.lines] or ["- no seed has the runs this claim compares yet"]
        md.append("")
    md += [
        "## Final points by variant",
        "",
        "| model | conditioning | n | FID (mean ± std) | class consistency |",
        "|---|---|---|---|---|",
    ]
    for key in sorted({(r["model"], r["conditioning"]) for r in V.training(records)}):
        runs = V.variant(records, *key)
        md.append(
            f"| {key[0]} | {key[1]} | {len(runs)} | {V.fmt([V.final_fid(r) for r in runs])} | "
            f"{V.fmt([r['eval']['class_consistency'] for r in runs])} |"
        )
    md += (
        ["", "## Figures", ""]
        + [f"![{p.stem}]({p.parent.name}/{p.name})" for p in figs]
        + ([] if figs else ["(none yet)"])
    )
    md += [
        "",
        "## Runs",
        "",
        "| run | model | conditioning | seed | sampler | cfg | samples | FID | class consistency "
        "| curve FID @ last | Gflops | params (M) | train s | experiment s |",
        "|" + "---|" * 14,
    ]
    md += [run_row(r) for r in records]
    md += ["", "## Not yet run", ""] + ([f"- {n}" for n in missing] or ["(none)"])
    if extra:
        md += ["", "Records not in the plan (ignored by the findings): " + ", ".join(extra)]
    text = "\n".join(md) + "\n"
    return atomic_write(out_md, lambda tmp: tmp.write_text(text))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.study.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=Path, default=RUNS_DIR)
    parser.add_argument("--plan", type=Path, default=PLAN_FILE)
    parser.add_argument("--out", type=Path, default=Path("docs/results.md"))
    parser.add_argument("--figures", type=Path, default=Path("docs/results"))
    args = parser.parse_args(argv)
    plan = load_plan(args.plan, check=False)
    print(render(load_records(args.runs), plan, args.out, args.figures))


if __name__ == "__main__":
    run_main(main)
