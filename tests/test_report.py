"""The sweep report: parsing `dvc exp show --json`, grouping into studies, the findings logic, figures and markdown.

tests/data/dvc_exp_show.json is the real output of DVC 3.67.1 for a scratch repository whose one stage writes a
metrics/curve.json (the curve stage's whole record, as it was before the record moved to reports/curve.json; the
parsing reads only the rows and their params): a baseline (DiT-Ti/4 adaLN-Zero), two finished experiments
(`cond-adaLN`, `size-S4`), one failed (`patch-Ti8-incontext`), one still queued (`queued-Ti2`), and a workspace
with an edited params.yaml. `test_report_on_a_real_dvc_repository` builds such a repository for real.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline.report as R

DATA = Path(__file__).parent / "data"
STEPS = [5, 10, 15, 20]
PROTOCOL = {"num_samples": 16, "sampler": "dpm-solver++", "sampling_steps": 3, "cfg_scale": 1.0, "cfg_channels": None,
            "labels": "balanced", "sample_seed": 0, "extractor": "classifier", "extractor_mode": None,
            "feature_dim": 128, "reference_count": 48, "reference_stats_sha256": "a" * 64}
# Forward Gflops (pipeline.flops, 16x16 latents) and parameters (M) of the presets used below.
SHAPE = {"DiT-Ti/8": (0.012, 4.50), "DiT-Ti/4": (0.046, 4.39), "DiT-Ti/2": (0.18, 4.37), "DiT-S/4": (0.35, 32.9)}


def curve(model: str, conditioning: str, final_fid: float, protocol: dict | None = None) -> dict:
    fid = [final_fid * f for f in (2.0, 1.5, 1.2, 1.0)]
    gflops, params = SHAPE[model]
    return {"steps": STEPS, "fid": fid, "class_consistency": [0.3, 0.5, 0.6, 0.7], "kid": [0.1] * 4,
            "precision": [0.5] * 4, "recall": [0.5] * 4, "final_step": 20, "final_fid": fid[-1],
            "final_class_consistency": 0.7, "model": model, "conditioning": conditioning,
            "patch_size": int(model.split("/")[1]), "gflops": gflops, "params_M": params,
            "protocol": {**PROTOCOL, **(protocol or {})}, "notes": {}}


def runs(fids: dict[tuple[str, str], float]) -> list[R.Run]:
    return [R.Run(f"{m}-{c}", "0" * 40, curve(m, c, fid)) for (m, c), fid in fids.items()]


# The paper's orderings: adaLN-Zero best; bigger model better; smaller patch better; Gflops predict FID.
PAPER_LIKE = {("DiT-Ti/4", "adaLN-Zero"): 30.0, ("DiT-Ti/4", "adaLN"): 35.0, ("DiT-Ti/4", "cross-attention"): 40.0,
              ("DiT-Ti/4", "in-context"): 50.0, ("DiT-S/4", "adaLN-Zero"): 20.0, ("DiT-Ti/8", "adaLN-Zero"): 45.0,
              ("DiT-Ti/2", "adaLN-Zero"): 22.0}


# --- dvc exp show --json --------------------------------------------------------------------------------------------

def test_table_rows_of_real_dvc_output():
    show = json.loads((DATA / "dvc_exp_show.json").read_text())
    rows = R.table_rows(show)
    # experiments first, then the baseline, then the workspace; the failed and the queued one are left out
    assert [name for name, _, _ in rows] == ["size-S4", "cond-adaLN", "master", "workspace"]
    assert all(len(rev) == 40 for _, rev, _ in rows[:3]) and rows[3][1] == "workspace"
    assert rows[0][2]["params"]["params.yaml"]["data"]["train"]["model"] == "DiT-S/4"


def test_rows_whose_commit_lacks_the_curve_are_left_out():
    # DVC lists every declared metrics file of a row; a baseline commit made before any run has an `error` entry
    show = json.loads((DATA / "dvc_exp_show.json").read_text())
    missing = {"error": {"type": "FileNotFoundError", "msg": "No such file or directory: 'metrics/curve.json'"}}
    for row in show:
        if row["rev"] != "workspace":
            row["data"]["metrics"]["metrics/curve.json"] = missing
    assert "master" not in [name for name, _, _ in R.table_rows(show)]


def test_collect_reads_whole_curves_and_drops_duplicates_and_stale_rows():
    show = json.loads((DATA / "dvc_exp_show.json").read_text())
    trained = {rev: data["params"]["params.yaml"]["data"]["train"] for _, rev, data in R.table_rows(show)}
    trained["workspace"] = trained[next(rev for name, rev, _ in R.table_rows(show) if name == "master")]
    asked = []

    def load(rev):  # what git show would return: the curve of the model the row trained
        asked.append(rev)
        return curve(trained[rev]["model"], trained[rev]["conditioning"], 30.0)

    found, excluded = R.collect(show, load)
    assert [r.name for r in found] == ["size-S4", "cond-adaLN", "master"] and found[0].curve["fid"][0] == 60.0
    assert excluded == [("workspace", "same curve as master")]
    assert len(asked) == 4

    stale, excluded = R.collect(show, lambda rev: curve("DiT-Ti/2", "adaLN-Zero", 30.0))
    assert stale == [] and all("stale" in why for _, why in excluded)


# --- studies and findings -------------------------------------------------------------------------------------------

def test_studies_group_by_params():
    panels = R.studies(runs(PAPER_LIKE))
    assert list(panels["conditioning"]) == ["DiT-Ti/4"]
    assert [r.conditioning for r in panels["conditioning"]["DiT-Ti/4"]] == \
        ["adaLN-Zero", "adaLN", "cross-attention", "in-context"]  # by final FID
    assert list(panels["size"]) == ["patch 4"]
    assert [r.model for r in panels["size"]["patch 4"]] == ["DiT-Ti/4", "DiT-S/4"]  # growing size
    assert list(panels["patch"]) == ["DiT-Ti"]
    assert [r.model for r in panels["patch"]["DiT-Ti"]] == ["DiT-Ti/8", "DiT-Ti/4", "DiT-Ti/2"]  # shrinking patch
    assert len(R.scaling_set(runs(PAPER_LIKE))) == 4  # the adaLN-Zero runs


def test_findings_reproduce_the_paper_on_paper_like_numbers():
    claims = R.evaluate_claims(runs(PAPER_LIKE))
    assert {k: v["verdict"] for k, v in claims.items()} == {k: "reproduced" for k in R.CLAIMS}
    assert "at 4 of 4 common checkpoints" in claims["conditioning"]["lines"][0]
    scaling = R.scaling_set(runs(PAPER_LIKE))
    assert [r.model for r in scaling] == ["DiT-Ti/4", "DiT-S/4", "DiT-Ti/8", "DiT-Ti/2"]
    expected = np.corrcoef(np.log([SHAPE[r.model][0] for r in scaling]),
                           np.log([r.curve["final_fid"] for r in scaling]))[0, 1]
    assert claims["gflops"]["r_gflops"] == pytest.approx(expected) and expected < -0.9
    assert abs(claims["gflops"]["r_params"]) < abs(expected)


def test_findings_detect_departures():
    fids = {**PAPER_LIKE, ("DiT-Ti/4", "adaLN"): 25.0, ("DiT-S/4", "adaLN-Zero"): 33.0}  # adaLN wins; S/4 worse
    claims = R.evaluate_claims(runs(fids))
    assert claims["conditioning"]["verdict"] == "not reproduced"
    assert "adaLN-Zero lowest at the final step: no" in claims["conditioning"]["lines"][0]
    assert claims["scaling"]["verdict"] == "partly reproduced"  # size fails, patch holds
    lines = claims["scaling"]["lines"]
    assert "larger model: no" in lines[0] and "smaller patch: yes" in lines[1]


def test_claims_without_runs_are_not_tested():
    claims = R.evaluate_claims(runs({("DiT-Ti/4", "adaLN"): 30.0, ("DiT-Ti/4", "in-context"): 40.0}))
    assert claims["conditioning"]["verdict"].startswith("not tested")
    assert claims["scaling"]["verdict"].startswith("not tested") and claims["gflops"]["r_gflops"] is None


def test_pearson_log():
    x, y = [1.0, 2.0, 4.0, 8.0], [9.0, 7.0, 4.0, 1.5]
    assert R.pearson_log(x, y) == pytest.approx(np.corrcoef(np.log(x), np.log(y))[0, 1])
    assert R.pearson_log(x[:2], y[:2]) is None and R.pearson_log([3.0] * 4, y) is None


def test_only_one_protocol_and_one_run_per_variant_are_compared():
    found = runs(PAPER_LIKE)
    other = R.Run("other-n", "1" * 40, curve("DiT-Ti/2", "adaLN-Zero", 10.0, {"num_samples": 64}))
    twin = R.Run("twin", "2" * 40, curve("DiT-Ti/4", "adaLN", 36.0))
    kept, excluded = R.comparable(found + [other, twin])
    assert [r.name for r in kept] == [r.name for r in found]
    assert excluded == [("other-n", "another protocol: num_samples=64"),
                        ("twin", "a second run of DiT-Ti/4 adaLN (kept DiT-Ti/4-adaLN)")]


# --- rendering ------------------------------------------------------------------------------------------------------

def test_render_writes_figures_and_markdown(tmp_path):
    out, figures = tmp_path / "docs" / "results.md", tmp_path / "docs" / "results"
    result = R.render(runs(PAPER_LIKE), [("old", "failed")], out, figures)
    names = sorted(p.name for p in figures.iterdir())
    assert names == ["fid_vs_gflops.png", "fid_vs_steps_conditioning.png", "fid_vs_steps_patch.png",
                     "fid_vs_steps_size.png"]
    for name in names:
        with Image.open(figures / name) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200
    text = out.read_text()
    for i, claim in enumerate(R.CLAIMS.values(), 1):
        assert f"{i}. **{claim}: reproduced.**" in text
    for name in names:
        assert f"(results/{name})" in text
    assert "| variant | model | conditioning | patch | params (M) | Gflops | steps | final FID | class consistency " \
           "| FID @ 5 | FID @ 10 | FID @ 15 | FID @ 20 |" in text
    assert "| DiT-S/4-adaLN-Zero | DiT-S/4 | adaLN-Zero | 4 | 32.90 | 0.350 | 20 | 20.00 | 0.700 | 40.00 | 30.00 " \
           "| 24.00 | 20.00 |" in text
    assert "- `old`: failed" in text and "16 samples" in text and "48 real images" in text
    assert result["runs"] == [r.name for r in runs(PAPER_LIKE)]


def test_render_with_the_conditioning_study_only(tmp_path):
    only = {k: v for k, v in PAPER_LIKE.items() if k[0] == "DiT-Ti/4"}
    result = R.render(runs(only), [], tmp_path / "results.md", tmp_path / "fig")
    assert sorted(p.name for p in result["figures"]) == ["fid_vs_gflops.png", "fid_vs_steps_conditioning.png"]
    assert "not tested" in (tmp_path / "results.md").read_text()


# --- for real: a scratch DVC repository with queued experiments -----------------------------------------------------

STAND_IN = '''import json, os, yaml
t = yaml.safe_load(open("params.yaml"))["train"]
fid, (gflops, params) = {fids!r}[t["model"] + " " + t["conditioning"]], {shape!r}[t["model"]]
os.makedirs("metrics", exist_ok=True)
os.makedirs("reports", exist_ok=True)
json.dump({curve!r} | {{"model": t["model"], "conditioning": t["conditioning"], "patch_size": int(t["model"][-1]),
           "fid": [2 * fid, 1.5 * fid, 1.2 * fid, fid], "final_fid": fid, "gflops": gflops, "params_M": params}},
          open("reports/curve.json", "w"))
json.dump({{"steps": 20, "fid": fid, "gflops": gflops, "params_M": params}}, open("metrics/curve.json", "w"))
'''


@pytest.mark.slow
def test_report_on_a_real_dvc_repository(tmp_path):
    """`dvc exp run --queue` x3 + `--run-all`, then `python -m pipeline.report` reads the experiments' curves."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    sh = lambda *cmd: subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)  # noqa: E731
    fids = {"DiT-Ti/4 adaLN-Zero": 30.0, "DiT-Ti/4 in-context": 50.0, "DiT-S/4 adaLN-Zero": 20.0,
            "DiT-Ti/2 adaLN-Zero": 22.0}
    (tmp_path / "stage.py").write_text(STAND_IN.format(fids=fids, shape=SHAPE, curve=curve("DiT-Ti/4", "adaLN-Zero", 1.0)))
    (tmp_path / "params.yaml").write_text("train:\n  model: DiT-Ti/4\n  conditioning: adaLN-Zero\n")
    (tmp_path / "dvc.yaml").write_text("stages:\n  curve:\n    cmd: python stage.py\n    deps: [stage.py]\n"
                                       "    params: [train]\n    outs:\n      - reports/curve.json:\n"
                                       "          cache: false\n    metrics:\n      - metrics/curve.json:\n"
                                       "          cache: false\n")
    sh("git", "init", "-q", "-b", "main")
    sh("dvc", "init", "-q")
    sh("dvc", "repro", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "baseline")
    for name, override in [("cond-in-context", "train.conditioning=in-context"), ("size-S4", "train.model=DiT-S/4"),
                           ("patch-Ti2", "train.model=DiT-Ti/2")]:
        sh("dvc", "exp", "run", "--queue", "-n", name, "-S", override)
    sh("dvc", "exp", "run", "--run-all", "--jobs", "1")
    out = tmp_path / "docs" / "results.md"
    result = R.main(["--repo", str(tmp_path), "--out", str(out), "--figures", str(tmp_path / "docs" / "results")])
    assert sorted(result["runs"]) == ["cond-in-context", "main", "patch-Ti2", "size-S4"]
    assert result["excluded"] == [("workspace", "same curve as main")]
    assert {k: v["verdict"] for k, v in result["claims"].items()} == {k: "reproduced" for k in R.CLAIMS}
    assert "| size-S4 | DiT-S/4 | adaLN-Zero | 4 |" in out.read_text()
