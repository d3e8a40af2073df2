"""The PNG plots that `dvc plots show` renders offline (pipeline/plots.py): bytes that depend on the numbers alone,
the training log's and the curve's; and, on a reduced `dvc repro curve`, a page whose images a real headless
Chromium loads with every host unreachable."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from reduced_default import run

from pipeline.curve import skipped_record, write_fid_plot
from pipeline.params.curve import CurveParams
from pipeline.params.load import load_section
from pipeline.plots import DPI, SIZE_IN, line_plot
from pipeline.train_log import write_log_plot

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = round(SIZE_IN[0] * DPI), round(SIZE_IN[1] * DPI)
ROWS = [
    {"step": s, "loss": 1 / s, "mse": 0.8 / s, "vb": 0.2 / s, "grad_norm": 2.0, "img_per_s": 100.0 + s}
    for s in (5, 10, 15, 20)
]


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """[(chunk type, chunk data)] of a PNG file."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, i = [], 8
    while i < len(data):
        length, kind = struct.unpack(">I4s", data[i : i + 8])
        chunks.append((kind, data[i + 8 : i + 8 + length]))
        i += 12 + length  # length, type, data, CRC
    return chunks


def plot_in_a_new_process(path: Path, hash_seed: str) -> bytes:
    code = (
        "import sys; from pipeline.plots import line_plot; "
        "line_plot(sys.argv[1], [5, 10, 15], {'loss': [0.3, 0.2, None], 'vb': [0.1, 0.05, 0.01]}, 't', 'x', 'y')"
    )
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code, str(path)], env=env, check=True, cwd=REPO)
    return path.read_bytes()


def test_a_plot_is_the_same_bytes_in_every_process_with_no_text_or_time_chunk(tmp_path):
    first, second = (plot_in_a_new_process(tmp_path / f"{seed}.png", seed) for seed in ("1", "2"))
    assert first == second
    kinds = [kind for kind, _ in png_chunks(first)]
    assert not {b"tEXt", b"iTXt", b"zTXt", b"tIME"} & set(kinds), kinds  # matplotlib's version, a date
    width, height = struct.unpack(">II", png_chunks(first)[0][1][:8])  # IHDR
    assert (width, height) == (WIDTH, HEIGHT)


def test_the_bytes_follow_the_numbers(tmp_path):
    line_plot(tmp_path / "a.png", [1, 2], {"fid": [30.0, 20.0]}, "t", "x", "y")
    line_plot(tmp_path / "b.png", [1, 2], {"fid": [30.0, 21.0]}, "t", "x", "y")
    line_plot(tmp_path / "empty.png", [], {"fid": []}, "t", "x", "y", empty="nothing yet")
    pngs = [(tmp_path / name).read_bytes() for name in ("a.png", "b.png", "empty.png")]
    assert len(set(pngs)) == 3


def test_the_training_plot_leaves_out_measured_time(tmp_path):
    write_log_plot(ROWS, tmp_path / "a.png")
    write_log_plot([{**row, "img_per_s": row["img_per_s"] * 3} for row in ROWS], tmp_path / "slower.png")
    write_log_plot([{**row, "vb": row["vb"] * 2} for row in ROWS], tmp_path / "other_vb.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "slower.png").read_bytes()
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "other_vb.png").read_bytes()
    write_log_plot([], tmp_path / "official.png")  # train.official_checkpoint: no log
    assert png_chunks((tmp_path / "official.png").read_bytes())[-1][0] == b"IEND"


def test_the_curve_plot_draws_the_record_or_says_there_is_none(tmp_path):
    params = load_section(CurveParams, "curve", REPO / "params.yaml")
    skipped = skipped_record("train.official_checkpoint x.pt was imported", params)
    record = {**skipped, "steps": [10, 20], "fid": [300.0, 250.0], "model": "DiT-S/2"}
    write_fid_plot(record, tmp_path / "curve.png")
    write_fid_plot({**record, "fid": [300.0, 240.0]}, tmp_path / "other.png")
    write_fid_plot(skipped, tmp_path / "skipped.png")
    pngs = [(tmp_path / name).read_bytes() for name in ("curve.png", "other.png", "skipped.png")]
    assert len(set(pngs)) == 3


# --- `dvc plots show` in a real browser ---------------------------------------------------------------------------

# Headless, without the sandbox (it needs privileges a container lacks), a GPU or background traffic; every host
# unresolvable, so the page renders as it does offline.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--host-resolver-rules=MAP * ~NOTFOUND",
]
# Appended to a copy of the page: once every <img> has loaded or failed (the load event), each one's naturalWidth
# (0: not loaded) goes into the DOM that --dump-dom prints.
IMAGE_CHECK = """<script>
window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "image-check";
  out.textContent = JSON.stringify([...document.images].map(i => [i.getAttribute("src"), i.naturalWidth]));
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str:
    """The browser's path; under CI (CI set, as .ci/run does) a missing one fails the test instead of skipping it."""
    found = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if found is None:
        reason = "no Chromium on PATH to render `dvc plots show` (Debian: apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI runs this test")
        pytest.skip(reason)
    return found


def loaded_images(browser: str, page: Path, profile: Path) -> dict[str, int]:
    """src -> naturalWidth of every <img> of `page` in headless Chromium with a fresh profile."""
    probe = page.with_name("image-check.html")  # beside the page: the same relative image paths
    text = page.read_text()
    assert "</body>" in text
    head, _, tail = text.rpartition("</body>")
    probe.write_text(head + IMAGE_CHECK + "</body>" + tail)
    dom = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    found = re.search(r'<pre id="image-check">(.*?)</pre>', dom, re.S)
    assert found, f"the check did not run:\n{dom[-2000:]}"
    return dict(json.loads(html.unescape(found.group(1))))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_dvc_plots_show_renders_the_png_plots_offline_in_chromium(tmp_path, request):
    browser = chromium()  # before the repro: no minutes spent to skip
    reduced_run = request.getfixturevalue("reduced_run")  # the session's `dvc repro`, train and curve included
    # The page and its images go outside the shared repository, which the test leaves as it was.
    run(["dvc", "plots", "show", "--out", str(tmp_path / "dvc_plots")], reduced_run.repo, reduced_run.env)
    page = tmp_path / "dvc_plots" / "index.html"

    images = loaded_images(browser, page, tmp_path / "profile")
    print(f"images on the page (src -> naturalWidth): {images}")
    for name in ("train_loss", "curve_fid"):
        sources = [src for src in images if name in src]
        assert len(sources) == 1, (name, images)
        assert images[sources[0]] == WIDTH, (name, images)
    assert all(width > 0 for width in images.values()), images
