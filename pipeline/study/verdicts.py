"""The decision rule of the study plan (docs/study-plan.md) and the seven claims, computed from run records.

The rule, per pair (A expected to beat B): reproduced when the ordering holds in every seed, or when the mean gap in
the expected direction exceeds twice the pooled std (sqrt of the mean of the two sample variances, ddof 1); not
reproduced otherwise. Orderings of 3+ variants: every adjacent pair must pass. A claim whose planned runs are not
all recorded is pending.

Records are the dicts of docs/results/runs/<name>.json (pipeline.study.sweep.record). The final point of a run is its
evaluate stage's numbers (`eval`); the curve is the curve stage's points (`curve`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
from scipy import stats

REFERENCE = "adaLN-Zero"
PENDING, REPRODUCED, NOT_REPRODUCED = "pending", "reproduced", "not reproduced"


@dataclass(frozen=True)
class Pair:
    """A expected to beat B on a per-seed quantity; `lower` says which way is better."""

    a: str
    b: str
    what: str
    a_by_seed: dict
    b_by_seed: dict
    lower: bool = True
    factor: float = 2.0

    @property
    def seeds(self) -> list:
        return sorted(set(self.a_by_seed) & set(self.b_by_seed))

    def _values(self):
        return (
            np.array([self.a_by_seed[s] for s in self.seeds], np.float64),
            np.array([self.b_by_seed[s] for s in self.seeds], np.float64),
        )

    @property
    def every_seed(self) -> bool:
        a, b = self._values()
        return bool(len(a)) and bool(np.all(a < b) if self.lower else np.all(a > b))

    @property
    def gap(self) -> float:
        """Mean gap in the expected direction (positive = A beats B)."""
        a, b = self._values()
        return float(b.mean() - a.mean()) if self.lower else float(a.mean() - b.mean())

    @property
    def pooled_std(self) -> float:
        a, b = self._values()
        if len(a) < 2:
            return math.nan
        return math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)

    @property
    def reproduced(self) -> bool:
        return self.every_seed or (not math.isnan(self.pooled_std) and self.gap > self.factor * self.pooled_std)

    def line(self, partial: bool = False) -> str:
        """The pair's values and the rule's outcome; `partial` (its study still has runs to come): how the ordering
        stands so far, not a verdict."""
        a, b = self._values()
        if partial:
            holds = "holds" if self.every_seed else "fails"
            return f"{self.a} {fmt(a)} vs {self.b} {fmt(b)} ({self.what}, n={len(a)}): ordering {holds} so far"
        why = (
            "ordering holds in every seed"
            if self.every_seed
            else f"mean gap {self.gap:+.3g} {'>' if self.reproduced else '<='} {self.factor:g} x pooled std "
            f"{self.pooled_std:.3g}"
            if not math.isnan(self.pooled_std)
            else "ordering fails, one seed"
        )
        return (
            f"{self.a} {fmt(a)} vs {self.b} {fmt(b)} ({self.what}, n={len(a)}): "
            f"{REPRODUCED if self.reproduced else NOT_REPRODUCED} ({why})"
        )


def fmt(values) -> str:
    v = np.asarray(values, np.float64)
    if len(v) == 0:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.3g}"
    return f"{v.mean():.3g} ± {v.std(ddof=1):.2g}"


def verdict(pairs: list[Pair], complete: bool) -> str:
    if not complete or not pairs:
        return PENDING
    return REPRODUCED if all(p.reproduced for p in pairs) else NOT_REPRODUCED


# --- selecting records --------------------------------------------------------------------------------------------


def reference_of(r: dict) -> str | None:
    """The sha256 of the reference statistics a run's FID was measured against (None in records without one)."""
    return (r.get("eval_protocol") or {}).get("reference_stats_sha256")


def one_reference(records: list[dict]) -> tuple[list[dict], list[dict], str | None]:
    """(kept, other, key): the records measured against the reference that most of them share (ties: the first in
    name order), and the rest. Each experiment trains its own VAE, latents and reference classifier, and CPUs with
    other kernels (AVX-512 or AMX against AVX2) train other weights from the same seed, so FIDs against different
    reference statistics are on different scales: the study compares only runs of one reference."""
    counts = Counter(reference_of(r) for r in records)
    if not counts:
        return [], [], None
    key = counts.most_common(1)[0][0]  # most_common keeps first-seen order among ties
    return ([r for r in records if reference_of(r) == key], [r for r in records if reference_of(r) != key], key)


def training(records: list[dict]) -> list[dict]:
    return [r for r in records if r["kind"] == "train"]


def by_seed(records: list[dict], value) -> dict:
    return {r["seed"]: value(r) for r in records}


def final_fid(r: dict) -> float:
    return r["eval"]["fid"]


def variant(records: list[dict], model: str, conditioning: str = REFERENCE) -> list[dict]:
    return [r for r in training(records) if (r["model"], r["conditioning"]) == (model, conditioning)]


# --- the claims ---------------------------------------------------------------------------------------------------


def conditioning_pairs(records, study) -> list[Pair]:
    ref = by_seed(variant(records, study["model"]), final_fid)
    return [
        Pair(REFERENCE, c, "final FID", ref, by_seed(variant(records, study["model"], c), final_fid))
        for c in study["conditionings"]
        if c != REFERENCE
    ]


def ordering_pairs(records, models: list[str], what: str = "final FID") -> list[Pair]:
    """`models` from worst to best expected: each adjacent pair, the later one expected lower."""
    vals = [by_seed(variant(records, m), final_fid) for m in models]
    return [Pair(models[i + 1], models[i], what, vals[i + 1], vals[i]) for i in range(len(models) - 1)]


def correlations(points: list[dict]) -> dict:
    """Pearson r of log final FID with log Gflops and with log params, and Spearman rho of each."""
    if len(points) < 3:
        return {}
    fid = np.log([final_fid(r) for r in points])
    out = {}
    for key in ("gflops", "params_M"):
        x = np.log([r[key] for r in points])
        if np.ptp(x) == 0 or np.ptp(fid) == 0:
            return {}
        out[f"pearson_{key}"] = float(np.corrcoef(x, fid)[0, 1])
        out[f"spearman_{key}"] = float(stats.spearmanr(x, fid).statistic)
    return out


def gflops_pair(records, seeds) -> tuple[Pair, dict]:
    """Per seed |r(log FID, log Gflops)| against |r(log FID, log params)| over that seed's adaLN-Zero runs."""
    zero = [r for r in training(records) if r["conditioning"] == REFERENCE]
    per_seed = {s: correlations([r for r in zero if r["seed"] == s]) for s in seeds}
    per_seed = {s: c for s, c in per_seed.items() if c}
    pair = Pair(
        "|r Gflops|",
        "|r params|",
        "Pearson, log-log, per seed",
        {s: abs(c["pearson_gflops"]) for s, c in per_seed.items()},
        {s: abs(c["pearson_params_M"]) for s, c in per_seed.items()},
        lower=False,
    )
    return pair, {"all": correlations(zero), "per_seed": per_seed}


def training_compute(r: dict, step: int) -> float:
    """Forward Gflops x batch x steps x 3 (forward + backward), in Gflop (the paper's MAC convention)."""
    return r["gflops"] * r["params"]["train"]["global_batch_size"] * step * 3


def fid_at_compute(r: dict, compute: float) -> float | None:
    """The curve's FID at a training compute, linear in log compute between points; None outside the curve."""
    xs = [math.log(training_compute(r, s)) for s in r["curve"]["steps"]]
    x = math.log(compute)
    if not xs[0] - 1e-9 <= x <= xs[-1] + 1e-9:
        return None
    return float(np.interp(x, xs, r["curve"]["fid"]))


def compute_pairs(records, models: list[str]) -> list[Pair]:
    """Per seed and adjacent sizes: both curves at the smaller model's final training compute (the larger one
    interpolated there); the larger expected to have the lower FID at equal compute (paper Fig. 9). A seed where the
    larger model's first checkpoint already costs more than that is left out of the pair (n says so)."""
    runs = {m: {r["seed"]: r for r in variant(records, m)} for m in models}
    pairs = []
    for small, large in zip(models, models[1:]):
        a, b = {}, {}
        for s in sorted(set(runs[small]) & set(runs[large])):
            rs, rl = runs[small][s], runs[large][s]
            at = training_compute(rs, rs["curve"]["steps"][-1])
            fid_large = fid_at_compute(rl, at)
            if fid_large is not None:
                a[s], b[s] = fid_large, rs["curve"]["fid"][-1]
        pairs.append(Pair(large, small, "curve FID at the smaller model's final training compute", a, b))
    return pairs


def sampling_pairs(records, study) -> list[Pair]:
    """Larger model at its fewest steps against the smaller at its most (more sampling compute)."""
    few, most = min(study["steps"]), max(study["steps"])

    def point(model, steps):
        return {
            r["seed"]: final_fid(r)
            for r in records
            if "sampling" in r["studies"] and r["model"] == model and r["params"]["sample"]["steps"] == steps
        }

    m = study["models"]
    return [
        Pair(
            f"{m[i + 1]} @{few}", f"{m[i]} @{most}", f"FID, {study['sampler']}", point(m[i + 1], few), point(m[i], most)
        )
        for i in range(len(m) - 1)
    ]


def guidance_points(records, study) -> dict[float, dict]:
    """{cfg: {seed: record}}; cfg 1.0 is the training run's own final point."""
    out: dict[float, dict] = {1.0: {r["seed"]: r for r in variant(records, study["model"])}}
    for r in records:
        if r["kind"] == "sampling" and "guidance" in r["studies"] and r["model"] == study["model"]:
            out.setdefault(float(r["params"]["sample"]["cfg_scale"]), {})[r["seed"]] = r
    return dict(sorted(out.items()))


def guidance_pairs(records, study) -> list[Pair]:
    pts = guidance_points(records, study)
    fid = {c: {s: final_fid(r) for s, r in v.items()} for c, v in pts.items()}
    cc = {c: {s: r["eval"]["class_consistency"] for s, r in v.items()} for c, v in pts.items()}
    pairs = [Pair("cfg 1.5", "cfg 1.0", "FID", fid.get(1.5, {}), fid.get(1.0, {}))]
    cfgs = sorted(cc)
    pairs += [
        Pair(
            f"cfg {cfgs[i + 1]:.1f}",
            f"cfg {cfgs[i]:.1f}",
            "class consistency",
            cc[cfgs[i + 1]],
            cc[cfgs[i]],
            lower=False,
        )
        for i in range(len(cfgs) - 1)
    ]
    return pairs


def regime(records, plan) -> dict:
    """The learning-regime check: class consistency of the reference at cfg 1.5, per seed, against the bar."""
    rg = plan["regime"]
    guided = guidance_points(records, {"model": rg["model"]}).get(float(rg["cfg_scale"]), {})
    cc = {seed: r["eval"]["class_consistency"] for seed, r in guided.items()}
    complete = set(cc) >= set(plan["seeds"])
    ok = all(v >= rg["min_class_consistency"] for v in cc.values())
    return {"cc": cc, "complete": complete, "met": (ok if complete else None), "bar": rg["min_class_consistency"]}
