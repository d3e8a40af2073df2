"""bench/default_verdict.py: docs/offline-default.md's decision rule applied to the final comparison's records, and
the committed final plan's arms as the verdict reads them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def write(records: Path, name: str, data: str, fid: float, cc: float, late_loss: float = 0.15) -> None:
    rec = {"arm": name, "data": data, "fid": fid, "class_consistency": cc, "matmul_gflops": 330.0, "commit": "c"}
    rec["train_loss"] = {"final": 0.12, "min": 0.1, "max_late": late_loss, "max_late_step": 3150}
    (records / f"{name}.json").write_text(json.dumps(rec))


def verdict(records: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "default_verdict.py"), "--records", str(records)],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def fill(records: Path, new_fids=(25.0, 26.0, 27.5), new_cc=(0.76, 0.77, 0.75), old_shapes_cc=(0.55, 0.5, 0.6)):
    for seed in range(3):
        write(records, f"old-s{seed}", "synthetic", 36.0 + seed, 0.66)
        write(records, f"new-s{seed}", "synthetic", new_fids[seed], new_cc[seed])
        write(records, f"old-shapes-s{seed}", "other-shapes-d0.25", 50.0, old_shapes_cc[seed])
        write(records, f"new-shapes-s{seed}", "other-shapes-d0.25", 40.0, 0.62)


def wall(records: Path, old: list[float], new: list[float]) -> None:
    runs = {rev: [{"total": t} for t in totals] for rev, totals in (("OLD", old), ("NEW", new))}
    (records / "wall_time.json").write_text(json.dumps(runs))


def test_a_candidate_that_meets_every_point_becomes_the_default(tmp_path):
    fill(tmp_path)
    wall(tmp_path, [470.0, 480.0, 490.0], [480.0, 490.0, 500.0])  # medians 480 vs 490: 1.021x
    out = verdict(tmp_path)
    assert "median FID 26.00" in out and "class consistency 0.760" in out
    assert "FID std 1.26" in out  # ddof 1 of 25, 26, 27.5
    assert "1.021x" in out and out.rstrip().endswith("the candidate becomes the default")


@pytest.mark.parametrize(
    ("change", "failing"),
    [
        (dict(new_fids=(20.0, 26.0, 29.0)), "2. stability: FAIL"),  # median 26 but std 4.58
        (dict(new_cc=(0.74, 0.80, 0.749)), "1. quality on the offline data: FAIL"),  # median 0.749
        (dict(old_shapes_cc=(0.63, 0.64, 0.65)), "3. held-out shapes: FAIL"),  # new 0.62 is below the old's 0.64
    ],
)
def test_one_failed_point_keeps_the_default(tmp_path, change, failing):
    fill(tmp_path, **change)
    wall(tmp_path, [480.0], [480.0])
    out = verdict(tmp_path)
    assert failing in out and out.rstrip().endswith("the default stays (a point failed)")


def test_one_diverged_training_keeps_the_default_though_the_medians_pass(tmp_path):
    fill(tmp_path)
    wall(tmp_path, [480.0], [480.0])
    write(tmp_path, "new-shapes-s0", "other-shapes-d0.25", 628.0, 0.10, late_loss=1.9e6)  # medians still pass
    out = verdict(tmp_path)
    assert "3. held-out shapes: pass" in out
    assert "5. no diverged training: FAIL  diverged: new-shapes-s0 (loss 1.9e+06 at step 3150, lowest 0.1)" in out
    assert out.rstrip().endswith("the default stays (a point failed)")
    for seed in range(3):  # records without the loss: not measured, so no verdict
        for tag in ("", "-shapes"):
            rec = json.loads((tmp_path / f"new{tag}-s{seed}.json").read_text())
            del rec["train_loss"]
            (tmp_path / f"new{tag}-s{seed}.json").write_text(json.dumps(rec))
    out = verdict(tmp_path)
    assert "5. no diverged training: not measured" in out and out.rstrip().endswith(
        "none yet (the comparison is incomplete)"
    )


def test_the_time_point_fails_above_three_percent_and_a_missing_part_gives_no_verdict(tmp_path):
    fill(tmp_path)
    assert verdict(tmp_path).rstrip().endswith("none yet (the comparison is incomplete)")  # no wall times yet
    wall(tmp_path, [480.0], [495.0])  # 1.031x
    assert "4. time: FAIL" in verdict(tmp_path)
    wall(tmp_path, [480.0], [480.0])
    (tmp_path / "new-s2.json").unlink()
    out = verdict(tmp_path)
    assert "1. quality on the offline data: not measured" in out and "none yet" in out


def test_a_failed_point_keeps_the_default_before_the_rest_is_measured(tmp_path):
    for seed, fid in enumerate((22.0, 17.8, 22.3)):  # std 2.57: no other record can make it pass
        write(tmp_path, f"old-s{seed}", "synthetic", 37.0, 0.66)
        write(tmp_path, f"new-s{seed}", "synthetic", fid, 0.77)
    out = verdict(tmp_path)
    assert "2. stability: FAIL" in out and "3. held-out shapes: not measured" in out and "4. time: not measured" in out
    assert out.rstrip().endswith("the default stays (a point failed)")


@pytest.mark.parametrize(
    "plan_file, held_out",
    [
        ("default-final.yaml", "other-shapes-d0.25"),
        ("default-final-clip.yaml", "other-shapes-d0.25-s1"),
        ("default-final-cosine.yaml", "other-shapes-d0.21875-s2"),
    ],
)
def test_the_committed_final_plans_have_the_arms_the_verdict_reads(plan_file, held_out):
    """Each final plan: the 12 arms, the old default unchanged, the candidate's keys only, on the calibrated held-out
    set (each later plan draws it with a seed no tuning used). A plan's `old` keys (the runaway guard off) apply to
    both versions alike."""
    plan = yaml.safe_load((REPO / "sweeps" / plan_file).read_text())
    arms, both = plan["arms"], plan.get("old", {})
    candidate = {**plan["candidate"], **both}
    for version in ("old", "new"):
        for tag, data in (("", "synthetic"), ("-shapes", held_out)):
            for seed in range(3):
                arm = arms[f"{version}{tag}-s{seed}"]
                assert arm.get("data", "synthetic") == data
                assert arm["set"]["train.seed"] == arm["set"]["sample.seed"] == seed
                changed = {k: v for k, v in arm["set"].items() if k not in ("train.seed", "sample.seed")}
                assert changed == (both if version == "old" else candidate)
    assert len(arms) == 12


def test_a_screen_record_shows_a_late_divergence_of_the_training_loss(tmp_path):
    """The screen's record of the loss log (plots/train.csv): a spike after the first tenth of the run, with its step
    and grad norm, and the loss that stays high after it; the early drop from the initial loss is not a spike."""
    sys.path.insert(0, str(REPO / "bench"))
    from screen_default import training_loss

    rows = [(50, 0.75, 1.0), (500, 0.12, 0.2), (1000, 0.11, 0.1), (1500, 1.9e6, 2.6e8), (2000, 2.3, 66.0)]
    log = tmp_path / "train.csv"
    log.write_text("step,loss,mse,vb,grad_norm,img_per_s\n" + "".join(f"{s},{v},0,0,{g},1\n" for s, v, g in rows))
    assert training_loss(log) == {
        "final": 2.3,
        "min": 0.11,
        "max_late": 1.9e6,
        "max_late_step": 1500,
        "grad_norm_at_max_late": 2.6e8,
    }


def test_a_data_name_gives_the_shapes_generator_its_difficulty_and_draws():
    sys.path.insert(0, str(REPO / "bench"))
    from screen_default import data_params, shapes_args

    assert shapes_args("other-shapes") == ["--difficulty", "1", "--seed", "0"]
    assert shapes_args("other-shapes-d0.25") == ["--difficulty", "0.25", "--seed", "0"]
    assert shapes_args("other-shapes-d0.25-s1") == ["--difficulty", "0.25", "--seed", "1"]
    assert data_params("other-shapes-d0.25-s1")["ingest.imagefolder.root"] == "inputs/other-shapes-d0.25-s1"
    with pytest.raises(SystemExit, match="unknown data"):
        data_params("other-shapes-s1-d0.25")


def test_one_diverged_training_decides_before_the_other_runs_have_records(tmp_path):
    write(tmp_path, "old-shapes-s0", "other-shapes-d0.25-s1", 32.2, 0.49)
    write(tmp_path, "new-shapes-s0", "other-shapes-d0.25-s1", 32.8, 0.59, late_loss=4.8e13)
    out = verdict(tmp_path)
    assert "| new | shapes | s0: 32.80 | | | s0: 0.590 | |" in out  # the records so far, seed by seed
    assert "5. no diverged training: FAIL  diverged: new-shapes-s0 (loss 4.8e+13 at step 3150" in out
    assert out.rstrip().endswith("the default stays (a point failed)")
