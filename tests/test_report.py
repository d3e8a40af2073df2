"""The report: the decision rule, the claims from constructed records of the committed plan, pending studies, and
rendering docs/results.md + figures from record files alone. `tests/test_sweep.py` writes real records from real
`dvc exp` experiments."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from scipy import stats

import pipeline.study.report as R
import pipeline.study.verdicts as V
from pipeline.study.plan import expand

REPO = Path(__file__).resolve().parents[1]
PLAN = yaml.safe_load((REPO / "sweeps/study-plan.yaml").read_text())
# forward Gflops and parameters (M) on 8x8x4 latents, as pipeline.flops counts them (test_flops checks the counter)
SHAPE = {
    ("DiT-Ti/2", "adaLN-Zero"): (0.04473, 4.364),
    ("DiT-4x128/2", "adaLN-Zero"): (0.01344, 1.406),
    ("DiT-8x256/2", "adaLN-Zero"): (0.10539, 10.004),
    ("DiT-Ti/4", "adaLN-Zero"): (0.01230, 4.389),
    ("DiT-Ti/1", "adaLN-Zero"): (0.18110, 4.366),
    ("DiT-Ti/2", "adaLN"): (0.04429, 3.919),
    ("DiT-Ti/2", "cross-attention"): (0.05139, 3.852),
    ("DiT-Ti/2", "in-context"): (0.04880, 2.961),
}
# paper-like final FIDs (lower = better): adaLN-Zero best; bigger and finer better
FID = {
    ("DiT-Ti/2", "adaLN-Zero"): 40.0,
    ("DiT-4x128/2", "adaLN-Zero"): 60.0,
    ("DiT-8x256/2", "adaLN-Zero"): 30.0,
    ("DiT-Ti/4", "adaLN-Zero"): 80.0,
    ("DiT-Ti/1", "adaLN-Zero"): 25.0,
    ("DiT-Ti/2", "adaLN"): 50.0,
    ("DiT-Ti/2", "cross-attention"): 45.0,
    ("DiT-Ti/2", "in-context"): 48.0,
}


def record(run, plan=PLAN, fid=None, seed_noise=0.5) -> dict:
    gflops, params = SHAPE[(run.model, run.conditioning)]
    base_fid = FID[(run.model, run.conditioning)] + seed_noise * run.seed
    sample = {"sampler": "dpm-solver++", "steps": 20, "cfg_scale": 1.0, "num_fid_samples": 1000, **run.sampling}
    if run.kind == "sampling" and sample["sampler"] == "ddpm":
        base_fid *= 1 + 5 / sample["steps"]  # more steps, lower FID
    cfg = float(sample["cfg_scale"])
    if cfg != 1.0:
        base_fid *= {1.5: 0.7, 2.0: 0.9, 3.0: 1.3, 4.0: 1.6}[cfg]
    cc = min(0.3 + 0.15 * cfg, 0.99)
    rec = {
        "name": run.name,
        "kind": run.kind,
        "base": run.base,
        "studies": list(run.studies),
        "model": run.model,
        "conditioning": run.conditioning,
        "seed": run.seed,
        "patch": int(run.model.split("/")[1]),
        "size": run.model[4:].split("/")[0],
        "gflops": gflops,
        "params_M": params,
        "plan": {"name": plan["name"], "commit": "c" * 40, "sha256": "s" * 64},
        "params": {"train": {"global_batch_size": 32, "train_steps": 3000}, "sample": sample},
        "eval": {"fid": fid if fid is not None else base_fid, "class_consistency": cc},
        "wall_s": {"experiment": 100.0, "train": 80.0, "sample": 10.0},
    }
    if run.kind == "train":
        f = rec["eval"]["fid"]
        rec["curve"] = {
            "steps": [750, 1500, 2250, 3000],
            "fid": [f * 1.3, f * 1.2, f * 1.15, f * 1.1],
            "class_consistency": [0.1, 0.2, 0.3, 0.4],
        }
    return rec


def all_records(**kw) -> list[dict]:
    return [record(r, **kw) for r in expand(PLAN)]


# --- the decision rule --------------------------------------------------------------------------------------------


def test_rule_ordering_in_every_seed():
    p = V.Pair("A", "B", "FID", {0: 10.0, 1: 20.0, 2: 30.0}, {0: 10.5, 1: 20.5, 2: 30.5})
    assert p.every_seed and p.reproduced  # the gap (0.5) is far below 2 pooled std (10): the ordering decides


def test_rule_mean_gap_over_twice_the_pooled_std():
    a, b = {0: 10.0, 1: 12.0, 2: 11.0}, {0: 14.0, 1: 11.95, 2: 14.0}  # seed 1 inverted
    p = V.Pair("A", "B", "FID", a, b)
    assert not p.every_seed
    pooled = math.sqrt((np.var(list(a.values()), ddof=1) + np.var(list(b.values()), ddof=1)) / 2)
    assert p.pooled_std == pytest.approx(pooled)
    # the same pooled std as the two-sample t statistic's with equal n (scipy): t = gap / (pooled * sqrt(2/n))
    t = stats.ttest_ind(list(b.values()), list(a.values())).statistic
    assert p.gap / (p.pooled_std * math.sqrt(2 / 3)) == pytest.approx(t)
    assert p.gap == pytest.approx(2.3167, abs=1e-3) and p.gap > 2 * p.pooled_std and p.reproduced


def test_rule_neither_is_not_reproduced():
    p = V.Pair("A", "B", "FID", {0: 10.0, 1: 14.0, 2: 12.0}, {0: 13.0, 1: 11.0, 2: 13.0})
    assert not p.every_seed and p.gap <= 2 * p.pooled_std and not p.reproduced
    assert "not reproduced" in p.line()
    # higher-is-better quantities (class consistency) flip the direction
    q = V.Pair("A", "B", "cc", {0: 0.6, 1: 0.7}, {0: 0.5, 1: 0.6}, lower=False)
    assert q.every_seed and q.reproduced
    assert V.verdict([p, q], complete=True) == "not reproduced" and V.verdict([q], complete=True) == "reproduced"


def test_rule_wrong_direction_gap_never_counts():
    p = V.Pair("A", "B", "FID", {0: 20.0, 1: 21.0}, {0: 10.0, 1: 10.5})
    assert p.gap < 0 and not p.reproduced


# --- claims -------------------------------------------------------------------------------------------------------


def test_paper_like_records_reproduce_every_claim():
    claims = R.claims(all_records(), PLAN)
    assert [c.verdict for c in claims] == ["reproduced"] * 7, [(c.number, c.lines) for c in claims]
    assert len(claims[0].lines) == 3 and len(claims[1].lines) == 2 and len(claims[2].lines) == 2


def test_departures_are_not_reproduced():
    recs = all_records()
    for r in recs:  # in-context beats adaLN-Zero in every seed; 8x256 no better than Ti in one seed
        if (r["model"], r["conditioning"], r["kind"]) == ("DiT-Ti/2", "in-context", "train"):
            r["eval"]["fid"] = 35.0 + r["seed"]
        if (r["model"], r["kind"], r["seed"]) == ("DiT-8x256/2", "train", 2):
            r["eval"]["fid"] = 45.0
    verdicts = {c.number: c.verdict for c in R.claims(recs, PLAN)}
    assert verdicts[1] == "not reproduced"
    assert verdicts[3] == "reproduced"
    # 8x256 vs Ti: 30, 30.5, 45 against 40, 40.5, 41: not in every seed; gap 5.33 vs pooled std 8.5
    assert verdicts[2] == "not reproduced"


def test_studies_with_missing_runs_are_pending():
    recs = [r for r in all_records() if not (r["model"] == "DiT-Ti/1" and r["seed"] == 2)]
    verdicts = {c.number: c.verdict for c in R.claims(recs, PLAN)}
    assert verdicts[3] == "pending" and verdicts[4] == "pending"
    assert verdicts[1] == verdicts[2] == verdicts[7] == "reproduced"
    assert {c.number: c.verdict for c in R.claims([], PLAN)} == dict.fromkeys(range(1, 8), "pending")


def test_gflops_correlation_matches_scipy():
    recs = all_records()
    _, corr = V.gflops_pair(recs, PLAN["seeds"])
    zero = [r for r in recs if r["kind"] == "train" and r["conditioning"] == "adaLN-Zero"]
    x, y = np.log([r["gflops"] for r in zero]), np.log([r["eval"]["fid"] for r in zero])
    assert corr["all"]["pearson_gflops"] == pytest.approx(stats.pearsonr(x, y).statistic)
    assert corr["all"]["pearson_gflops"] < -0.9 and abs(corr["all"]["pearson_params_M"]) < 0.9


def test_fid_at_compute_interpolates_in_log_compute():
    rec = record(next(r for r in expand(PLAN) if r.kind == "train"))
    rec["curve"] = {"steps": [750, 1500], "fid": [100.0, 50.0]}
    c750, c1500 = V.training_compute(rec, 750), V.training_compute(rec, 1500)
    assert c750 == pytest.approx(0.04473 * 32 * 750 * 3)
    assert V.fid_at_compute(rec, math.sqrt(c750 * c1500)) == pytest.approx(75.0)
    assert V.fid_at_compute(rec, c750 / 2) is None and V.fid_at_compute(rec, c1500) == pytest.approx(50.0)


def test_compute_efficiency_compares_at_the_smaller_models_final_compute():
    recs = all_records()
    pairs = V.compute_pairs(recs, PLAN["studies"]["size"]["models"])
    # 4x128's final compute (0.01344 x 3000) lies after Ti's 750-step point; Ti's (0.04473 x 3000) after 8x256's
    assert [len(p.seeds) for p in pairs] == [3, 3]
    ti = next(r for r in recs if r["model"] == "DiT-Ti/2" and r["seed"] == 0 and r["kind"] == "train")
    small = next(r for r in recs if r["model"] == "DiT-4x128/2" and r["seed"] == 0 and r["kind"] == "train")
    at = V.training_compute(small, 3000)
    assert pairs[0].a_by_seed[0] == pytest.approx(V.fid_at_compute(ti, at))
    assert pairs[0].b_by_seed[0] == small["curve"]["fid"][-1]


def test_regime_check():
    check = V.regime(all_records(), PLAN)
    assert check["cc"] == pytest.approx({0: 0.525, 1: 0.525, 2: 0.525}) and check["met"] and check["bar"] == 0.5
    assert V.regime([], PLAN)["met"] is None


# --- rendering ----------------------------------------------------------------------------------------------------


def write_records(recs, runs_dir: Path) -> None:
    runs_dir.mkdir(parents=True)
    for r in recs:
        (runs_dir / f"{r['name']}.json").write_text(json.dumps(r))


def test_render_from_record_files(tmp_path):
    write_records(all_records(), tmp_path / "runs")
    out = R.render(R.load_records(tmp_path / "runs"), PLAN, tmp_path / "results.md", tmp_path / "fig")
    md = out.read_text()
    headers = [line for line in md.splitlines() if line.startswith("### ")]
    assert len(headers) == 7 and all(h.endswith(": reproduced") for h in headers), headers
    assert "Not yet run\n\n(none)" in md and "cccccccccccc" in md
    assert "Learning regime" in md and "met (cc by seed" in md
    pngs = sorted(p.name for p in (tmp_path / "fig").glob("*.png"))
    assert pngs == [
        "fid_vs_gflops.png",
        "fid_vs_sampling_compute.png",
        "fid_vs_steps_conditioning.png",
        "fid_vs_steps_patch.png",
        "fid_vs_steps_size.png",
        "fid_vs_training_compute.png",
        "guidance.png",
    ]
    for p in pngs:
        assert f"(fig/{p})" in md and Image.open(tmp_path / "fig" / p).size[0] > 500
    assert md.count("\n| Ti-p2-adaLN-Zero-s") == 3 + 12 + 4  # training runs, cfg runs, seed 0's DDPM runs


def test_render_of_a_partial_and_an_empty_sweep(tmp_path):
    recs = [r for r in all_records() if r["seed"] == 0]
    write_records(recs, tmp_path / "runs")
    md = R.render(R.load_records(tmp_path / "runs"), PLAN, tmp_path / "a.md", tmp_path / "fig").read_text()
    headers = [line for line in md.splitlines() if line.startswith("### ")]
    assert "Partial sweep" in md and sum(h.endswith(": pending") for h in headers) == 6
    assert "- Ti-p2-adaLN-Zero-s1" in md
    assert "### 6. more sampling steps do not make a smaller model match a larger one (Fig. 10): reproduced" in md
    md = R.render([], PLAN, tmp_path / "b.md", tmp_path / "none").read_text()
    assert "pending: sweep not yet run" in md and md.count("): pending") == 7 and "(none yet)" in md


def test_a_file_that_is_not_a_record_is_one_error(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"name": "y"}))
    with pytest.raises(R.UserError, match="not a sweep record"):
        R.load_records(tmp_path)


def test_runs_against_another_reference_are_not_pooled(tmp_path):
    # Each machine trains its own VAE, latents and classifier (CPU kernels differ, so do the weights): a run measured
    # against other reference statistics is listed apart, and the studies it belongs to wait for a rerun.
    recs = all_records()
    for r in recs:
        r["eval_protocol"] = {"reference_stats_sha256": "a" * 64}
        r["machine"] = {"cpu": "CPU A"}
    moved = [r for r in recs if r["name"] in ("Ti-p2-adaLN-Zero-s0", "Ti-p2-adaLN-Zero-s0-cfg2")]
    for r in moved:
        r["eval_protocol"] = {"reference_stats_sha256": "b" * 64}
        r["machine"] = {"cpu": "CPU B"}
        r["eval"]["fid"] = 1.0  # would win every ordering if it were pooled
    kept, other, key = V.one_reference(recs)
    assert key == "a" * 64 and {r["name"] for r in other} == {r["name"] for r in moved}
    assert len(kept) + len(other) == len(recs)
    write_records(recs, tmp_path / "runs")
    md = R.render(R.load_records(tmp_path / "runs"), PLAN, tmp_path / "r.md", tmp_path / "fig").read_text()
    assert "Measured against another reference" in md and "- Ti-p2-adaLN-Zero-s0-cfg2 (bbbbbbbb, CPU B)" in md
    assert "aaaaaaaa" in md and "CPU A" in md
    verdicts = [h.split(": ")[-1] for h in md.splitlines() if h.startswith("### ")]
    # Ti/2 seed 0 is in every study but sampling compute (4x128 and 8x256 only)
    assert verdicts == ["pending"] * 5 + ["reproduced", "pending"], verdicts
    assert "| Ti-p2-adaLN-Zero-s0 |" not in md and "- Ti-p2-adaLN-Zero-s0\n" in md  # not pooled; still to run


def test_records_without_a_reference_hash_are_one_group():
    kept, other, key = V.one_reference(all_records())
    assert key is None and not other and len(kept) == len(all_records())
