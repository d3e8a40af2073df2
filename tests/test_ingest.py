"""The ingest stage: sources, ADM crop, mode conversion, bad inputs, deterministic shards, the manifest contract."""

import copy
import io
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, PngImagePlugin

from pipeline import ingest as data, synthetic
from pipeline.artifacts import ArtifactError, sha256_file
from pipeline.formats import images as image_shards
from pipeline.params.ingest import IngestParams
from pipeline.params.load import ParamsError, from_dict, load_section
from pipeline.provenance import NO_INPUT

REPO = Path(__file__).resolve().parents[1]
BASE = {
    "source": "synthetic",
    "image_size": 16,
    "shard_size": 16,
    "max_bad_fraction": 0.01,
    "min_image_side": 8,
    "max_image_pixels": 1_000_000,
    "max_file_bytes": 1_000_000,
    "num_workers": 0,
    "synthetic": {"num_images": 40, "num_classes": 10, "seed": 0},
    "hf": {
        "path": "unused",
        "local_dir": NO_INPUT,
        "name": None,
        "split": "train",
        "revision": None,
        "image_column": "img",
        "label_column": "label",
        "streaming": False,
        "max_images": None,
    },
    "imagefolder": {"root": "unused"},
}


def make_params(**changes) -> IngestParams:
    """BASE with `changes`; a dotted key ("synthetic.seed") sets a nested value."""
    raw = copy.deepcopy(BASE)
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = raw
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return from_dict(IngestParams, raw, "ingest")


def shard_hashes(out: Path) -> list[str]:
    return [sha256_file(p) for p in sorted(out.glob("shard-*.parquet"))]


def rows(out: Path) -> list[dict]:
    return [r for s in image_shards.read_manifest(out)["shards"] for r in pq.read_table(out / s["file"]).to_pylist()]


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def noise(rng, h, w, c=3) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, c) if c > 1 else (h, w), dtype=np.uint8)


# --------------------------------------------------------------------------------------------------- params


def test_params_yaml_section_loads():
    params = load_section(IngestParams, "ingest", REPO / "params.yaml")
    assert params.synthetic.num_classes <= len(synthetic.CLASSES)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("synthetic.num_classes", 11, "num_classes' must be in 1..10"),
        ("max_bad_fraction", 1.0, "max_bad_fraction' must be in [0, 1)"),
        ("image_size", 0, "image_size' must be >= 1"),
        ("source", "folder", "must be one of ['synthetic', 'hf', 'imagefolder']"),
    ],
)
def test_bad_params_are_named(key, value, message):
    with pytest.raises(ParamsError, match=re.escape(message)):
        make_params(**{key: value})


# ------------------------------------------------------------------------------------------------ synthetic


def test_synthetic_is_deterministic_balanced_and_independent_of_workers(tmp_path, monkeypatch):
    params = make_params()
    m1 = data.ingest(params, tmp_path / "a")
    data.ingest(params, tmp_path / "b")
    assert shard_hashes(tmp_path / "a") == shard_hashes(tmp_path / "b") and len(shard_hashes(tmp_path / "a")) == 3
    data.ingest(make_params(**{"synthetic.seed": 1}), tmp_path / "seed1")
    assert set(shard_hashes(tmp_path / "seed1")).isdisjoint(shard_hashes(tmp_path / "a"))

    monkeypatch.setattr(data, "CHUNK_ROWS", 7)  # several chunks in flight on 2 processes
    data.ingest(make_params(num_workers=2), tmp_path / "workers")
    assert shard_hashes(tmp_path / "workers") == shard_hashes(tmp_path / "a")

    assert m1 == {"count": 40, "skipped": 0}
    _, labels, _ = image_shards.read_images(tmp_path / "a")
    assert np.bincount(labels).tolist() == [4] * 10
    manifest = image_shards.read_manifest(tmp_path / "a")
    assert manifest["class_names"][:3] == ["circle", "square", "triangle"] and manifest["image_size"] == 16
    assert [s["count"] for s in manifest["shards"]] == [16, 16, 8]
    assert [s["sha256"] for s in manifest["shards"]] == shard_hashes(tmp_path / "a")


def test_synthetic_classes_are_shapes_not_colours(tmp_path):
    """A small CNN separates the 10 shapes on held-out images; the mean colour alone does not."""
    torch = pytest.importorskip("torch")
    data.ingest(make_params(image_size=32, shard_size=500, **{"synthetic.num_images": 1200}), tmp_path)
    images, labels, _ = image_shards.read_images(tmp_path)
    x = torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2) / 127.5 - 1
    y = torch.tensor(labels)
    x_train, y_train, x_test, y_test = x[:1000], y[:1000], x[1000:], y[1000:]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: extra threads only contend on a shared CPU
    try:
        accuracy = _train_small_cnn(torch, x_train, y_train, x_test, y_test, steps=300)
    finally:
        torch.set_num_threads(threads)
    assert accuracy >= 0.8, accuracy

    colour = x.mean((2, 3))  # (N, 3): nearest class centroid of the mean colour
    centroids = torch.stack([colour[:1000][y_train == k].mean(0) for k in range(10)])
    colour_accuracy = (torch.cdist(colour[1000:], centroids).argmin(1) == y_test).float().mean().item()
    assert colour_accuracy < 0.25, colour_accuracy


def _train_small_cnn(torch, x_train, y_train, x_test, y_test, steps):
    """Held-out accuracy of a 3-layer CNN trained for `steps` Adam steps of batch 32."""
    torch.manual_seed(0)
    layers = []
    for c_in, c_out in ((3, 16), (16, 32), (32, 64)):
        layers += [
            torch.nn.Conv2d(c_in, c_out, 3, padding=1),
            torch.nn.BatchNorm2d(c_out),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
        ]
    net = torch.nn.Sequential(*layers[:-1], torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (32,), generator=gen)
        loss = torch.nn.functional.cross_entropy(net(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        return (net(x_test).argmax(1) == y_test).float().mean().item()


def test_rerun_removes_stale_shards_and_reads_back(tmp_path):
    data.ingest(make_params(), tmp_path)
    assert len(list(tmp_path.glob("shard-*.parquet"))) == 3
    data.ingest(make_params(shard_size=40), tmp_path)
    assert [p.name for p in tmp_path.glob("shard-*.parquet")] == ["shard-00000.parquet"]
    images, _, _ = image_shards.read_images(tmp_path)
    assert len(images) == 40 and images[0].shape == (16, 16, 3) and images[0].dtype == np.uint8
    assert [r["key"] for r in rows(tmp_path)][:2] == ["synthetic/0", "synthetic/1"]
    with pytest.raises(ArtifactError, match="dvc repro ingest"):
        image_shards.read_manifest(tmp_path / "missing")


# ------------------------------------------------------------------------------------------- preprocessing


def adm_center_crop_reference(pil_image, image_size):
    """ADM's center_crop_arr written out plainly, as in guided-diffusion."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


@pytest.mark.parametrize("image_size", [16, 32])
def test_center_crop_matches_adm(image_size):
    rng = np.random.default_rng(0)
    sizes = [(image_size, image_size), (9, 9), (image_size * 2, image_size * 2 - 1), (300, 41), (41, 300)]
    sizes += [tuple(int(v) for v in rng.integers(8, 400, size=2)) for _ in range(12)]
    for w, h in sizes:
        img = Image.fromarray(noise(rng, h, w))
        ours = data.center_crop_adm(img, image_size)
        assert ours.shape == (image_size, image_size, 3)
        np.testing.assert_array_equal(ours, adm_center_crop_reference(img, image_size), err_msg=f"{w}x{h}")


def test_to_rgb_modes():
    gray16 = np.array([[0, 257 * 100, 65535, 1000]], np.uint16)  # 16-bit: scaled by 1/257, not clipped at 255
    assert np.asarray(data.to_rgb(Image.fromarray(gray16)))[..., 0].tolist() == [[0, 100, 255, 4]]
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [0, 0, 0, 128]]], np.uint8)
    out = np.asarray(data.to_rgb(Image.fromarray(rgba, "RGBA")))
    assert out.tolist() == [[[10, 20, 30], [255, 255, 255], [127, 127, 127]]]  # composited on white
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    palette.putpalette([200, 0, 0, 0, 0, 200])
    palette.info["transparency"] = 1
    assert np.asarray(data.to_rgb(palette)).tolist() == [[[200, 0, 0], [255, 255, 255]]]
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 0, 0))
    assert data.to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 255)
    assert data.to_rgb(Image.new("LA", (1, 1), (50, 255))).getpixel((0, 0)) == (50, 50, 50)
    assert data.to_rgb(Image.new("L", (1, 1), 70)).mode == "RGB"


# -------------------------------------------------------------------------------------------- imagefolder


def plant_imagefolder(root: Path) -> tuple[set[str], dict[str, str]]:
    """A tree of valid images in many modes plus bad files; returns (valid keys, {bad key: reason})."""
    rng = np.random.default_rng(0)
    valid = {
        "cat/rgb.jpg": png_bytes(Image.fromarray(noise(rng, 30, 40)), "JPEG"),
        "cat/gray.png": png_bytes(Image.fromarray(noise(rng, 20, 20, 1), "L")),
        "cat/small_upscaled.png": png_bytes(Image.fromarray(noise(rng, 9, 12))),
        "dog/palette.png": png_bytes(Image.fromarray(noise(rng, 24, 36)).convert("P")),
        "dog/rgba.png": png_bytes(Image.fromarray(noise(rng, 33, 17, 4), "RGBA")),
        "dog/nested/deep.webp": png_bytes(Image.fromarray(noise(rng, 64, 64)), "WEBP"),
        "emu/cmyk.jpg": png_bytes(Image.fromarray(noise(rng, 40, 30, 4), "CMYK"), "JPEG"),
        "emu/gray16.png": png_bytes(Image.fromarray((np.arange(40 * 20).reshape(20, 40) * 80).astype(np.uint16))),
        "emu/UPPER.PNG": png_bytes(Image.fromarray(noise(rng, 16, 16))),
    }
    bad = {
        "cat/empty.png": (b"", "empty_file"),
        "dog/truncated.jpg": (png_bytes(Image.fromarray(noise(rng, 64, 64)), "JPEG")[:600], "corrupt"),
        "dog/text.png": (b"this is not an image\n", "not_an_image"),
        "emu/tiny.png": (png_bytes(Image.new("RGB", (1, 1), (1, 2, 3))), "too_small"),
    }
    for key, content in {**valid, **{k: v for k, (v, _) in bad.items()}}.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(content)
    (root / "cat" / "notes.txt").write_text("not an image extension: ignored, as torchvision does")
    return set(valid), {k: reason for k, (_, reason) in bad.items()}


def test_imagefolder_bad_inputs_are_reported_and_valid_ones_kept(tmp_path):
    root = tmp_path / "raw"
    valid, bad = plant_imagefolder(root)
    out = tmp_path / "images"
    metrics = data.ingest(
        make_params(source="imagefolder", max_bad_fraction=0.4, **{"imagefolder.root": str(root)}), out
    )
    assert metrics == {"count": len(valid), "skipped": len(bad)}
    table = rows(out)
    assert {r["key"] for r in table} == valid
    names = ["cat", "dog", "emu"]
    assert all(names[r["label"]] == r["key"].split("/")[0] for r in table)
    assert [r["key"] for r in table] == sorted(r["key"] for r in table)  # class, then file order

    report = json.loads((out / "skipped.json").read_text())
    assert {e["key"]: e["reason"] for e in report} == bad and all(e["detail"] for e in report)
    manifest = image_shards.read_manifest(out)
    assert manifest["skipped"] == {"count": 4, "by_reason": {r: 1 for r in sorted(bad.values())}}
    assert manifest["class_names"] == names and manifest["source"]["kind"] == "imagefolder"

    by_key = {r["key"]: image_shards.decode_png(r["image"], 16, r["key"]) for r in table}
    gray16 = np.asarray(Image.open(root / "emu/gray16.png"), np.float64)
    expected = Image.fromarray(np.rint(gray16 / 257).astype(np.uint8), "L").convert("RGB")
    np.testing.assert_array_equal(by_key["emu/gray16.png"], adm_center_crop_reference(expected, 16))
    cmyk = Image.open(root / "emu/cmyk.jpg").convert("RGB")
    np.testing.assert_array_equal(by_key["emu/cmyk.jpg"], adm_center_crop_reference(cmyk, 16))


def test_imagefolder_too_many_bad_inputs_fails_after_writing_the_report(tmp_path):
    root = tmp_path / "raw"
    _, bad = plant_imagefolder(root)
    out = tmp_path / "images"
    params = make_params(source="imagefolder", max_bad_fraction=0.1, **{"imagefolder.root": str(root)})
    with pytest.raises(data.IngestError, match=r"4 of 13 inputs read \(30.77%\).*skipped.json"):
        data.ingest(params, out)
    assert {e["key"] for e in json.loads((out / "skipped.json").read_text())} == set(bad)
    assert not (out / "manifest.json").exists()


def test_imagefolder_parallel_matches_serial(tmp_path, monkeypatch):
    root = tmp_path / "raw"
    plant_imagefolder(root)
    params = make_params(source="imagefolder", max_bad_fraction=0.4, **{"imagefolder.root": str(root)})
    data.ingest(params, tmp_path / "serial")
    monkeypatch.setattr(data, "CHUNK_ROWS", 3)
    data.ingest(
        make_params(
            num_workers=2,
            **{k: getattr(params, k) for k in ("source", "max_bad_fraction")},
            **{"imagefolder.root": str(root)},
        ),
        tmp_path / "parallel",
    )
    assert shard_hashes(tmp_path / "parallel") == shard_hashes(tmp_path / "serial")
    assert (tmp_path / "parallel/skipped.json").read_bytes() == (tmp_path / "serial/skipped.json").read_bytes()


def test_imagefolder_missing_root(tmp_path):
    with pytest.raises(data.IngestError, match="not a directory"):
        data.ingest(make_params(source="imagefolder", **{"imagefolder.root": str(tmp_path / "nope")}), tmp_path)


# ------------------------------------------------------------------------------------ inputs that must not stop it


def hostile_root(tmp_path: Path) -> Path:
    """Two classes of two valid images each: the hostile file under test is added beside them."""
    root = tmp_path / "raw"
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            (root / name / f"{i}.png").write_bytes(png_bytes(Image.fromarray(noise(rng, 20, 20))))
    return root


def skipped_after_ingest(tmp_path: Path, root: Path, **changes) -> dict[str, str]:
    """{key: reason} of skipped.json after an ingest of `root` that keeps the four valid images."""
    params = make_params(source="imagefolder", max_bad_fraction=0.5, **{"imagefolder.root": str(root)}, **changes)
    assert data.ingest(params, tmp_path / "images")["count"] == 4
    return {e["key"]: e["reason"] for e in json.loads((tmp_path / "images" / "skipped.json").read_text())}


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def test_a_ztxt_bomb_is_counted_not_fatal(tmp_path):
    root = hostile_root(tmp_path)
    text = PngImagePlugin.PngInfo()
    text.add_text("comment", "a" * (8 << 20), zip=True)  # 8 MB of text in a ~8 KB file: past Pillow's 1 MB limit
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "PNG", pnginfo=text)
    (root / "cat" / "bomb.png").write_bytes(buf.getvalue())
    assert skipped_after_ingest(tmp_path, root) == {"cat/bomb.png": "decompression_bomb"}


def test_a_header_claiming_too_many_pixels_is_refused_before_decoding(tmp_path):
    root = hostile_root(tmp_path)
    # over max_image_pixels; over Pillow's decompression-bomb warning (89 MP); over its error (179 MP)
    for name, side in (("wide.png", 2000), ("warned.png", 10000), ("huge.png", 20000)):
        header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
        (root / "dog" / name).write_bytes(
            b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b"")
        )
    too_many = {"dog/huge.png": "too_many_pixels", "dog/warned.png": "too_many_pixels"}
    assert skipped_after_ingest(tmp_path, root) == {**too_many, "dog/wide.png": "too_many_pixels"}
    # Pillow's decompression-bomb warning and error reject too, where the param would allow the image
    assert skipped_after_ingest(tmp_path, root, max_image_pixels=10**9) == {
        **too_many,
        "dog/wide.png": "corrupt",
    }  # 2000 x 2000 claimed, no pixel data


def test_a_file_over_max_file_bytes_is_not_read(tmp_path, monkeypatch):
    root = hostile_root(tmp_path)
    (root / "cat" / "big.png").write_bytes(b"\0" * 1_000_001)
    os.mkfifo(root / "cat" / "pipe.png")  # opening it for reading would wait for a writer forever
    assert skipped_after_ingest(tmp_path, root) == {"cat/big.png": "file_too_large", "cat/pipe.png": "not_a_file"}


def test_links_out_of_the_root_are_counted_not_followed(tmp_path):
    root = hostile_root(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png_bytes(Image.new("RGB", (20, 20))))
    (root / "cat" / "link.png").symlink_to(outside / "secret.png")
    (root / "cat" / "inside.png").symlink_to(root / "dog" / "0.png")  # a link within the root is read
    (root / "dog" / "folder").symlink_to(outside, target_is_directory=True)
    (root / "emu").symlink_to(outside, target_is_directory=True)  # a linked class folder is no class
    params = make_params(source="imagefolder", max_bad_fraction=0.5, **{"imagefolder.root": str(root)})
    assert data.ingest(params, tmp_path / "images")["count"] == 5
    report = {e["key"]: e["reason"] for e in json.loads((tmp_path / "images" / "skipped.json").read_text())}
    assert report == {"cat/link.png": "outside_root", "dog/folder/": "symlinked_folder", "emu/": "symlinked_folder"}
    assert image_shards.read_manifest(tmp_path / "images")["class_names"] == ["cat", "dog"]


def test_an_unreadable_subfolder_is_counted(tmp_path, monkeypatch):
    root = hostile_root(tmp_path)
    (root / "dog" / "locked").mkdir()
    (root / "dog" / "locked" / "hidden.png").write_bytes(png_bytes(Image.new("RGB", (20, 20))))
    (root / "dog" / "locked").chmod(0)
    if os.geteuid() == 0:  # root reads any folder: make the listing fail as it does for everyone else
        scandir = os.scandir
        monkeypatch.setattr(
            os,
            "scandir",
            lambda path=".": (
                scandir(path)
                if Path(path) != root / "dog" / "locked"
                else (_ for _ in ()).throw(PermissionError(13, "Permission denied", str(path)))
            ),
        )
    try:
        assert skipped_after_ingest(tmp_path, root) == {"dog/locked/": "unreadable_folder"}
    finally:
        (root / "dog" / "locked").chmod(0o755)


def test_hf_rows_read_local_files_only_inside_the_dataset(tmp_path, hf_dir):
    import datasets

    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["ant", "bee"])})
    inside = hf_dir / "images" / "ok.png"
    inside.parent.mkdir()
    inside.write_bytes(png_bytes(Image.new("RGB", (20, 20), (9, 9, 9))))
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(inside.read_bytes())
    rows = [{"bytes": None, "path": p} for p in ("/etc/hostname", "/dev/zero", str(outside), str(inside))]
    table = datasets.Dataset.from_dict({"img": rows, "label": [0, 1, 0, 1]}, features=features)
    for old in (hf_dir / "data").iterdir():
        old.unlink()
    table.to_parquet(str(hf_dir / "data" / "train-00000-of-00001.parquet"))
    params = make_params(source="hf", max_bad_fraction=0.9, **{"hf.path": None, "hf.local_dir": str(hf_dir)})
    metrics = data.ingest(params, tmp_path / "images")
    assert metrics == {"count": 1, "skipped": 3}
    report = {e["key"]: e["reason"] for e in json.loads((tmp_path / "images" / "skipped.json").read_text())}
    assert report == {"train/0": "outside_root", "train/1": "outside_root", "train/2": "outside_root"}


# -------------------------------------------------------------------------------------------- Hugging Face


@pytest.fixture
def hf_dir(tmp_path, monkeypatch):
    """A local parquet dataset (Image + ClassLabel features), loaded through the same path as a hub id."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    rng = np.random.default_rng(0)
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=["ant", "bee"]), "extra": datasets.Value("int64")}
    )
    images = [{"bytes": png_bytes(Image.fromarray(noise(rng, 20, 28))), "path": None} for _ in range(12)]
    labels = [i % 2 for i in range(10)] + [-1, None]  # the last two have no usable label
    root = tmp_path / "hf_dataset"
    (root / "data").mkdir(parents=True)
    ds = datasets.Dataset.from_dict({"img": images, "label": labels, "extra": list(range(12))}, features=features)
    ds.to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    return root


def hf_params(path, **changes):
    """A hub id (a string), or a local dataset directory (a Path), which goes in `local_dir`: DVC sees it there."""
    where = {"hf.path": None, "hf.local_dir": str(path)} if isinstance(path, Path) else {"hf.path": path}
    return make_params(source="hf", max_bad_fraction=0.2, **where, **{f"hf.{k}": v for k, v in changes.items()})


def test_hf_local_parquet_streaming_and_map_style_agree(tmp_path, hf_dir):
    metrics = data.ingest(hf_params(hf_dir), tmp_path / "map")
    data.ingest(hf_params(hf_dir, streaming=True), tmp_path / "stream")
    assert metrics == {"count": 10, "skipped": 2}
    assert shard_hashes(tmp_path / "map") == shard_hashes(tmp_path / "stream")
    report = json.loads((tmp_path / "map/skipped.json").read_text())
    assert [(e["key"], e["reason"]) for e in report] == [("train/10", "unknown_label"), ("train/11", "unknown_label")]
    manifest = image_shards.read_manifest(tmp_path / "map")
    assert manifest["class_names"] == ["ant", "bee"]
    assert manifest["source"]["kind"] == "hf" and manifest["source"]["split"] == "train"
    assert manifest["source"]["resolved_revision"] is None  # a local directory has no hub commit: dvc.lock pins it
    assert manifest["source"]["local_dir"] == str(hf_dir) and manifest["source"]["path"] is None
    assert [r["label"] for r in rows(tmp_path / "map")] == [i % 2 for i in range(10)]

    assert data.ingest(hf_params(hf_dir, max_images=5), tmp_path / "five")["count"] == 5


def test_hf_errors_are_clear(tmp_path, hf_dir):
    with pytest.raises(data.IngestError, match="ingest.hf.image_column = 'image' is not a column"):
        data.ingest(hf_params(hf_dir, image_column="image"), tmp_path / "a")
    with pytest.raises(data.IngestError, match="column 'extra' is .*not a ClassLabel"):
        data.ingest(hf_params(hf_dir, label_column="extra"), tmp_path / "b")
    # Offline (conftest sets HF_HUB_OFFLINE=1) and not cached: a message that says what to fix.
    with pytest.raises(data.IngestError, match="could not load.*HF_TOKEN"):
        data.ingest(hf_params("nobody-here/no-such-dataset"), tmp_path / "c")
    with pytest.raises(data.IngestError, match="DVC cannot see"):  # a local directory must be a dvc.yaml dep
        data.ingest(hf_params(str(hf_dir)), tmp_path / "d")
    with pytest.raises(ParamsError, match="exactly one of 'ingest.hf.path'"):  # both, then neither
        make_params(**{"hf.path": "org/data", "hf.local_dir": str(hf_dir)})
    with pytest.raises(ParamsError, match="exactly one of 'ingest.hf.path'"):
        make_params(**{"hf.path": None, "hf.local_dir": NO_INPUT})


def test_imagefolder_root_none_names_the_fix(tmp_path):
    with pytest.raises(data.IngestError, match="dvc add inputs/<name>"):
        data.ingest(make_params(source="imagefolder", **{"imagefolder.root": NO_INPUT}), tmp_path)


# ----------------------------------------------------------------------------------------------------- stage


def test_stage_script_end_to_end(tmp_path):
    raw = copy.deepcopy(BASE)
    (tmp_path / "params.yaml").write_text(json.dumps({"ingest": raw}))  # JSON is YAML
    out, metrics = tmp_path / "data/images", tmp_path / "metrics/ingest.json"
    leftovers = [tmp_path / "data/.images.k1ll3d_0", tmp_path / "metrics/.ingest.json.k1ll3d_0.tmp"]  # a SIGKILL's
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    subprocess.run(
        [
            sys.executable,
            str(REPO / "stages/ingest.py"),
            "--params",
            str(tmp_path / "params.yaml"),
            "--out",
            str(out),
            "--metrics",
            str(metrics),
        ],
        check=True,
        cwd=tmp_path,
    )
    assert json.loads(metrics.read_text()) == {"count": 40, "skipped": 0}
    assert image_shards.read_manifest(out)["count"] == 40
    assert not any(p.exists() for p in leftovers)
