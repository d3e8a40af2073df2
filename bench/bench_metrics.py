"""Timings of the evaluate stage's heavy parts at paper scale: precision/recall over 50K x 50K features, KID,
the 2048-d FID sqrtm, and the classifier extractor's training and extraction throughput.

    python bench/bench_metrics.py --device cuda                     # paper scale: 50K vs 50K, D = 2048
    python bench/bench_metrics.py --device cpu --n 5000 --dim 128   # the offline default's scale
    python bench/bench_metrics.py --device cuda --inception-weights /path/to/inception-2015-12-05.pt
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from timing import timed

from pipeline.determinism import torch_threads
from pipeline.features import ClassifierExtractor, InceptionExtractor, build_classifier, classifier_arch
from pipeline.metrics import fid_from_features, kernel_inception_distance, precision_recall


def bench_metrics(n: int, dim: int, device: torch.device) -> None:
    rng = np.random.default_rng(0)
    real = rng.normal(size=(n, dim)).astype(np.float32)
    fake = (rng.normal(size=(n, dim)) * 1.05 + 0.02).astype(np.float32)
    print("  ->", timed(f"precision/recall k=3, {n} x {n}, D={dim}, {device}", precision_recall, real, fake, 3, device))
    print("  ->", timed("KID 10 subsets of 500 (float64, CPU)", kernel_inception_distance, fake, real, 10, 500, 0))
    print(
        "  ->",
        timed(
            f"FID incl. np.cov and scipy sqrtm at D={dim} (CPU)",
            fid_from_features,
            fake.astype(np.float64),
            real.mean(axis=0, dtype=np.float64),
            np.cov(real, rowvar=False),
        ),
    )


def bench_classifier(device: torch.device, image_size: int, batch: int) -> None:
    net = build_classifier(classifier_arch(10, image_size))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = torch.rand(batch, 3, image_size, image_size) * 255, torch.randint(0, 10, (batch,))
    steps = 20
    start = time.perf_counter()
    with torch_threads(1):  # as the reference stage trains it
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(net.classify(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    print(
        f"classifier training (CPU, 1 thread, batch {batch}, {image_size} px): "
        f"{steps / (time.perf_counter() - start):.1f} steps/s"
    )
    images = np.random.default_rng(0).integers(0, 256, (2000, image_size, image_size, 3), dtype=np.uint8)
    extractor = ClassifierExtractor(net.eval(), classifier_arch(10, image_size), device)
    extractor.extract(images[:250], 250)  # warm-up
    start = time.perf_counter()
    extractor.extract(images, 250)
    print(f"classifier extraction ({device}): {len(images) / (time.perf_counter() - start):.0f} img/s")


def bench_inception(weights: str, device: torch.device, image_size: int) -> None:
    images = np.random.default_rng(0).integers(0, 256, (500, image_size, image_size, 3), dtype=np.uint8)
    for mode in ("clean", "legacy_tensorflow"):
        extractor = InceptionExtractor(weights, mode, device)
        extractor.extract(images[:50], 50)  # warm-up
        start = time.perf_counter()
        extractor.extract(images, 250)
        print(f"inception {mode} ({device}, {image_size} px): {len(images) / (time.perf_counter() - start):.0f} img/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=50_000, help="points per side for precision/recall")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--inception-weights", help="a local inception-2015-12-05.pt (file name kept)")
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"device {device}" + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
    bench_metrics(args.n, args.dim, device)
    bench_classifier(device, args.image_size, batch=64)
    if args.inception_weights:
        bench_inception(args.inception_weights, device, 256)


if __name__ == "__main__":
    main()
