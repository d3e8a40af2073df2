"""bench/other_shapes.py, the held-out data set: its first version stays byte for byte what it was at difficulty 1,
and the difficulty knob moves the images without changing their classes."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import other_shapes as O  # noqa: E402  (bench/ is a folder of scripts, not a package)

# sha256 of images 0-49 (pixels, then the label byte) of seed 0 at 32 px, as the first version drew them.
FIRST_VERSION = "67f3c1cb8fdc3828b12ead47588d77331915bb0107bf80de07a844add59b2f99"


def digest(difficulty: float) -> str:
    h = hashlib.sha256()
    for index in range(50):
        pixels, label = O.draw_image(0, index, 32, difficulty)
        h.update(pixels.tobytes())
        h.update(bytes([label]))
    return h.hexdigest()


def test_difficulty_one_is_the_first_version_byte_for_byte():
    assert digest(1.0) == FIRST_VERSION


def test_easier_images_keep_their_class_and_are_calmer():
    easy, hard = (np.stack([O.draw_image(0, i, 32, t)[0] for i in range(40)]).astype(float) for t in (0.0, 1.0))
    assert [O.draw_image(0, i, 32, 0.0)[1] for i in range(40)] == [O.draw_image(0, i, 32, 1.0)[1] for i in range(40)]
    # no pixel noise at the easy end: neighbouring pixels differ less
    assert np.abs(np.diff(easy, axis=2)).mean() < np.abs(np.diff(hard, axis=2)).mean()


def test_the_difficulty_must_lie_between_zero_and_one(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "other_shapes.py"), str(tmp_path / "x"), "--difficulty", "1.5"],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "from 0 to 1" in done.stderr
