"""The stages' start-up records (pipeline/timing.py) and bench/wall_time.py's reading of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from pipeline import timing

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import wall_time  # noqa: E402  (bench/ is a folder of scripts, not a package)

# A stand-in stage entry point: run_main around work that marks its first useful step, then fails or not.
STAGE = """
import sys, time
from pipeline.errors import run_main, UserError
from pipeline.timing import mark_ready
def main():
    time.sleep(0.2)          # set-up after the imports
    mark_ready(); mark_ready()  # only the first counts
    if sys.argv[1] == "fail":
        raise UserError("bad input")
run_main(main)
"""


def run_stage(tmp_path: Path, how: str, timings: bool = True) -> tuple[float, float, subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHONPATH": str(REPO), timing.STAGE_ENV: "demo"}
    env.pop(timing.TIMINGS_DIR_ENV, None)
    if timings:
        env[timing.TIMINGS_DIR_ENV] = str(tmp_path / "timings")
    before = time.time()
    done = subprocess.run([sys.executable, "-c", STAGE, how], env=env, capture_output=True, text=True)
    return before, time.time(), done


def read_events(path: Path) -> dict[str, list[float]]:
    events: dict[str, list[float]] = {}
    for line in path.read_text().splitlines():
        e = json.loads(line)
        events.setdefault(e["event"], []).append(e["t"])
    return events


def test_process_start_time_agrees_with_psutil():
    # psutil places the boot at /proc/stat's whole-second btime: it is up to 1 s early, never late
    assert 0 <= timing.process_start_time() - psutil.Process().create_time() < 1.05


def test_a_stage_records_launch_ready_and_end_in_order(tmp_path):
    before, after, done = run_stage(tmp_path, "ok")
    assert done.returncode == 0, done.stderr
    events = read_events(tmp_path / "timings" / "demo.jsonl")
    assert [len(events[k]) for k in ("start", "imported", "ready", "end")] == [1, 1, 1, 1], events
    start, imported, ready, end = (events[k][0] for k in ("start", "imported", "ready", "end"))
    assert before - 0.02 <= start <= imported <= ready <= end <= after
    assert ready - imported >= 0.2  # the set-up between the imports and the first useful work counts as start-up
    assert wall_time.startup_seconds(tmp_path / "timings" / "demo.jsonl") == ready - start


def test_a_failed_stage_has_no_end_and_timings_off_write_nothing(tmp_path):
    _, _, done = run_stage(tmp_path, "fail")
    assert done.returncode == 1 and "error: bad input" in done.stderr
    assert "end" not in read_events(tmp_path / "timings" / "demo.jsonl")
    _, _, done = run_stage(tmp_path / "off", "ok", timings=False)
    assert done.returncode == 0 and not (tmp_path / "off").exists()


def test_workers_take_the_stage_and_the_directory_only_when_timings_are_on(monkeypatch, tmp_path):
    monkeypatch.delenv(timing.TIMINGS_DIR_ENV, raising=False)
    monkeypatch.setenv(timing.STAGE_ENV, "train")
    assert timing.worker_env() == {timing.STAGE_ENV: "train"}
    monkeypatch.setenv(timing.TIMINGS_DIR_ENV, "rel/timings")
    assert timing.worker_env() == {timing.TIMINGS_DIR_ENV: os.path.abspath("rel/timings"), timing.STAGE_ENV: "train"}


def test_wall_time_table_from_stage_lines_and_records(tmp_path):
    walls = wall_time.stage_walls([(1.0, "ingest"), (4.0, "vae"), (10.0, "train")], end=30.0)
    assert walls == {"ingest": 3.0, "vae": 6.0, "train": 20.0}
    (tmp_path / "train.jsonl").write_text(
        "".join(
            json.dumps(e) + "\n"
            for e in [
                {"event": "start", "t": 100.0, "pid": 1},
                {"event": "imported", "t": 102.0, "pid": 1},
                {"event": "ready", "t": 109.0, "pid": 2},
                {"event": "ready", "t": 110.0, "pid": 3},
                {"event": "end", "t": 120.0, "pid": 1},
            ]
        )
    )
    (tmp_path / "vae.jsonl").write_text(
        json.dumps({"event": "start", "t": 5.0, "pid": 1})
        + "\n"
        + json.dumps({"event": "imported", "t": 7.5, "pid": 1})
        + "\n"
    )
    assert wall_time.startup_seconds(tmp_path / "train.jsonl") == 9.0  # the earliest worker's first step
    assert wall_time.startup_seconds(tmp_path / "vae.jsonl") == 2.5  # no ready mark: the imports only
    assert wall_time.startup_seconds(tmp_path / "ingest.jsonl") is None
    run = {
        "rev": "HEAD",
        "commit": "0" * 40,
        "total": 40.0,
        "walls": walls,
        "before_first_stage": 1.0,
        "startups": {"ingest": None, "vae": 2.5, "train": 9.0},
        "metrics": {"eval": {"fid": 38.0}},
        "overrides": [],
    }
    table = wall_time.summarise([run, {**run, "total": 50.0}])
    assert "train" in table and "45.0" in table and "0 min 40.0 s, 0 min 50.0 s" in table
