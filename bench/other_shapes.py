"""A second offline dataset, kept out of every tuning of the default: it judges whether a choice tuned on the
synthetic set (`ingest.source: synthetic`) carries over to images it was not tuned on.

It differs from the synthetic set wherever that set is easy: ten other shapes, placed off centre, turned and scaled;
a striped texture on the shape; a mottled, noisy background instead of a clean gradient. It is written as an image
folder (`<root>/<class>/<index>.png`), so it enters the pipeline as a user's own data does, with only the ingest
source changed:

    python bench/other_shapes.py inputs/other-shapes
    dvc repro -S ingest.source=imagefolder -S ingest.imagefolder.root=inputs/other-shapes   # or edit params.yaml

`--difficulty t` moves every variation between an easy end (t = 0: larger, centred, upright shapes, a calm
background without pixel noise, faint stripes) and the first version of the set (t = 1, the default, byte for
byte), linearly, from the same seeds; docs/offline-default.md calibrates t on the old default.

Image `index` depends only on (seed, index, difficulty): the same bytes on every machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("arrow", "chevron", "diamond", "ell", "ellipse", "half-disk", "hexagon", "hourglass", "tee", "two-dots")
SUPERSAMPLE = 4


def outline(shape: str) -> list[list[tuple[float, float]]]:
    """The shape as polygons in unit coordinates (x right, y down, inside the unit disk)."""
    if shape == "arrow":
        return [[(-0.9, -0.22), (0.2, -0.22), (0.2, -0.6), (0.9, 0.0), (0.2, 0.6), (0.2, 0.22), (-0.9, 0.22)]]
    if shape == "chevron":
        return [[(-0.8, -0.7), (0.0, 0.1), (0.8, -0.7), (0.8, -0.1), (0.0, 0.7), (-0.8, -0.1)]]
    if shape == "diamond":
        return [[(0.0, -0.95), (0.6, 0.0), (0.0, 0.95), (-0.6, 0.0)]]
    if shape == "ell":
        return [[(-0.7, -0.9), (-0.25, -0.9), (-0.25, 0.45), (0.7, 0.45), (0.7, 0.9), (-0.7, 0.9)]]
    if shape == "ellipse":
        a = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return [list(zip(0.95 * np.cos(a), 0.5 * np.sin(a)))]
    if shape == "half-disk":
        a = np.linspace(0, np.pi, 25)
        return [list(zip(0.9 * np.cos(a), 0.9 * np.sin(a) - 0.35))]
    if shape == "hexagon":
        a = np.arange(6) * np.pi / 3
        return [list(zip(0.85 * np.cos(a), 0.85 * np.sin(a)))]
    if shape == "hourglass":
        return [[(-0.7, -0.9), (0.7, -0.9), (0.0, 0.0)], [(0.0, 0.0), (0.7, 0.9), (-0.7, 0.9)]]
    if shape == "tee":
        return [[(-0.85, -0.85), (0.85, -0.85), (0.85, -0.4), (0.22, -0.4), (0.22, 0.9), (-0.22, 0.9), (-0.22, -0.4),
                 (-0.85, -0.4)]]  # fmt: skip
    if shape == "two-dots":
        a = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        return [list(zip(0.38 * np.cos(a) + dx, 0.38 * np.sin(a))) for dx in (-0.5, 0.5)]
    raise ValueError(f"unknown shape {shape!r}")


def between(easy: float, hard: float, difficulty: float) -> float:
    return easy + (hard - easy) * difficulty


def draw_image(seed: int, index: int, image_size: int, difficulty: float = 1.0) -> tuple[np.ndarray, int]:
    """Image `index`: ((S, S, 3) uint8, label). Every spread below runs from its easy end to the first version's
    (difficulty 1), which it reproduces byte for byte."""
    t = difficulty
    rng = np.random.default_rng([seed, index])
    label = index % len(CLASSES)
    size = image_size * SUPERSAMPLE
    turn = between(0.0, 0.45, t)  # up to about +-25 degrees
    angle = rng.uniform(-turn, turn)
    radius = rng.uniform(between(0.32, 0.24, t), between(0.42, 0.36, t)) * size
    shift = between(0.0, 0.12, t)
    centre = size / 2 + rng.uniform(-shift, shift, size=2) * size
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for polygon in outline(CLASSES[label]):
        points = np.asarray(polygon) @ rot.T * radius + centre
        draw.polygon([tuple(p) for p in points], fill=255)
    alpha = np.asarray(mask.resize((image_size, image_size), Image.Resampling.BOX), np.float64)[..., None] / 255

    # Background: a 4x4 field of colours around a random base colour, smoothly upsampled, with pixel noise.
    base = rng.uniform(30, 225, size=3)
    spread = between(15, 60, t)
    coarse = Image.fromarray(np.clip(base + rng.uniform(-spread, spread, size=(4, 4, 3)), 0, 255).astype(np.uint8))
    background = np.asarray(coarse.resize((image_size, image_size), Image.Resampling.BICUBIC), np.float64)
    background = background + rng.normal(0, between(0, 6, t), size=background.shape)
    # Foreground: one colour far from the background's mean, modulated by stripes of random pitch and direction.
    foreground = rng.uniform(0, 255, size=3)
    while np.linalg.norm(foreground - background.mean((0, 1))) < 110:
        foreground = rng.uniform(0, 255, size=3)
    yy, xx = np.mgrid[0:image_size, 0:image_size]
    direction, pitch = rng.uniform(0, np.pi), rng.uniform(3, 8)
    stripes = np.sin(2 * np.pi * (np.cos(direction) * xx + np.sin(direction) * yy) / pitch)[..., None]
    pixels = background * (1 - alpha) + (foreground + between(10, 30, t) * stripes) * alpha
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8), label


def write_folder(root: Path, num_images: int, image_size: int, seed: int, difficulty: float = 1.0) -> None:
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for index in range(num_images):
        pixels, label = draw_image(seed, index, image_size, difficulty)
        Image.fromarray(pixels).save(root / CLASSES[label] / f"{index:05d}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path, help="the image folder to write, e.g. inputs/other-shapes")
    ap.add_argument("--num-images", type=int, default=2000)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--difficulty", type=float, default=1.0, help="0 (easy end) to 1 (the first version; default)")
    ap.add_argument("--grid", type=Path, default=None, help="also save an 8-per-class preview grid here (PNG)")
    args = ap.parse_args()
    if args.root.exists() and any(args.root.iterdir()):
        raise SystemExit(f"{args.root} is not empty: remove it first, so no image of another setting is left in it")
    if not 0 <= args.difficulty <= 1:
        raise SystemExit(f"--difficulty {args.difficulty}: give a number from 0 to 1")
    write_folder(args.root, args.num_images, args.image_size, args.seed, args.difficulty)
    if args.grid is not None:
        draw = lambda index: draw_image(args.seed, index, args.image_size, args.difficulty)[0]  # noqa: E731
        rows = [np.concatenate([draw(c + 10 * k) for k in range(8)], 1)
                for c in range(len(CLASSES))]  # fmt: skip
        Image.fromarray(np.concatenate(rows, 0)).save(args.grid)
    print(f"wrote {args.num_images} images of {len(CLASSES)} classes to {args.root}")


if __name__ == "__main__":
    main()
