"""`ingest` stage: a source of labelled images -> ADM center crop -> deterministic parquet shards (`dit-images` v1).

Sources (params `ingest.source`):
- `synthetic`: a procedurally drawn 10-class shape dataset, the offline default (`pipeline/synthetic.py`).
- `hf`: any Hugging Face dataset with an `Image` column and a `ClassLabel` column (hub id or local directory).
- `imagefolder`: torchvision's `root/<class_name>/<file>` tree, as read by DiT's official train.py.

Every input is counted: it becomes a row, or an entry in `skipped.json` with a reason. The stage fails when the
rejected fraction exceeds `max_bad_fraction`, after writing the report. Same inputs + params => same shard bytes.
No input can stop the stage or exhaust a worker: files are read through `pipeline.inputs` (nothing outside the
source's roots, regular files of at most `max_file_bytes`), an image whose header claims more than
`max_image_pixels` is refused before it is decoded, and any failure of the decoder on one file rejects that file.

The shards are written through `pipeline.formats.images`, which is also their one reader: vae, encode and reference
read them from there, without importing the sources here.
"""

from __future__ import annotations

import io
import itertools
import multiprocessing
import os
import warnings
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from pipeline import artifacts, synthetic
from pipeline.errors import UserError
from pipeline.formats.images import ShardWriter, encode_png, write_images_manifest
from pipeline.inputs import Rejected as _Reject, Skip, check_size, list_files, read_file, real_roots
from pipeline.params.ingest import HFParams, IngestParams
from pipeline.provenance import NO_INPUT, local_input

CHUNK_ROWS = 128  # inputs per worker task: large enough to amortise IPC, small enough to bound memory
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


class IngestError(UserError, RuntimeError):
    """The source cannot be read, or too many of its inputs are unusable."""


class Row(NamedTuple):
    """One input's outcome: `png` is set for a kept image, `reason` (+ `detail`) for a rejected one."""

    key: str
    label: int | None
    png: bytes | None
    reason: str | None = None
    detail: str | None = None


@dataclass
class Source:
    class_names: list[str]
    chunks: Iterable[list]  # lists of work items, in output order
    work: Callable[[list], list[Row]]  # picklable: runs in worker processes
    total: int | None  # an upper bound on the number of inputs where known (progress, early failure)
    info: dict  # the manifest's `source`


# ----------------------------------------------------------------------------------------------- preprocessing


def center_crop_adm(img: Image.Image, image_size: int) -> np.ndarray:
    """ADM's center crop (guided-diffusion `center_crop_arr`, used by DiT's train.py): RGB PIL -> (S, S, 3) uint8.

    Halve with a BOX filter while the short side is >= 2S (cheap anti-aliasing), resize bicubically so the short
    side is S (upsampling small images), then cut the central S x S square.
    """
    while min(img.size) >= 2 * image_size:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.Resampling.BOX)
    scale = image_size / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), resample=Image.Resampling.BICUBIC)
    left, top = (img.width - image_size) // 2, (img.height - image_size) // 2
    return np.asarray(img.crop((left, top, left + image_size, top + image_size)))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB.

    16-bit gray (I;16*, and I, which PIL uses for 16-bit sources) is scaled to 8 bits by x / 257, not clipped.
    Transparency (RGBA, LA, PA, P or RGB with a transparent colour) is composited on white: fully opaque images come
    out exactly as torchvision's `convert("RGB")`, transparent ones as a viewer shows them. CMYK uses PIL's plain
    conversion (no ICC), like torchvision's loader. Float images (F) have no defined range and are rejected.
    """
    if img.mode.startswith("I"):
        gray16 = np.clip(np.asarray(img, dtype=np.float64), 0, 65535)  # (H, W)
        return Image.fromarray(np.rint(gray16 / 257.0).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        raise _Reject("unsupported_mode", "32-bit float image: its value range is undefined")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.int32)  # (H, W, 4)
        alpha = rgba[..., 3:]
        rgb = (rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255
        return Image.fromarray(rgb.astype(np.uint8), "RGB")
    if img.mode == "RGB":
        return img
    try:
        return img.convert("RGB")  # 1, L, P, CMYK, YCbCr, ...
    except ValueError as e:  # PIL has no conversion from this mode (e.g. LAB)
        raise _Reject("unsupported_mode", f"{img.mode}: {e}") from e


# What Pillow's PNG reader raises (as ValueError) when a compressed text or ICC chunk expands past its limits
_CHUNK_BOMBS = ("Decompressed data too large", "Too much memory used in text chunks")


def preprocess(data: bytes, image_size: int, min_image_side: int, max_image_pixels: int) -> bytes:
    """Encoded image file -> PNG of its ADM center crop. Raises `_Reject` for unusable inputs."""
    if len(data) == 0:
        raise _Reject("empty_file", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow's own bomb warning rejects too
            with Image.open(io.BytesIO(data)) as img:  # reads the header only
                if img.width * img.height > max_image_pixels:
                    raise _Reject(
                        "too_many_pixels", f"{img.width}x{img.height} > ingest.max_image_pixels = {max_image_pixels}"
                    )
                img.load()  # decode fully now: truncation shows up here, not later
                if min(img.size) < min_image_side:
                    raise _Reject("too_small", f"{img.width}x{img.height} < ingest.min_image_side = {min_image_side}")
                rgb = to_rgb(img)
    except _Reject:
        raise
    except UnidentifiedImageError as e:
        raise _Reject("not_an_image", "PIL cannot identify the image format") from e  # str(e) holds an address
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _Reject("too_many_pixels", str(e)) from e
    except ValueError as e:
        raise _Reject("decompression_bomb" if str(e).startswith(_CHUNK_BOMBS) else "corrupt", str(e)) from e
    except Exception as e:  # OSError, SyntaxError for truncated data; anything else a malformed file provokes
        raise _Reject("corrupt", f"{type(e).__name__}: {e}") from e
    return encode_png(center_crop_adm(rgb, image_size))


def _decode_chunk(
    items: list[tuple[str, int | None, bytes | str | Skip | None]],
    image_size: int,
    min_image_side: int,
    num_classes: int,
    max_image_pixels: int,
    max_file_bytes: int,
    roots: tuple[str, ...],
) -> list[Row]:
    """Work items (key, label, file bytes, a local path inside `roots`, or a Skip) -> Rows. Runs in a worker."""
    rows = []
    for key, label, payload in items:
        try:
            if isinstance(payload, Skip):
                raise _Reject(*payload)
            if label is None or not 0 <= label < num_classes:
                raise _Reject("unknown_label", f"label {label!r} not in 0..{num_classes - 1}")
            if payload is None:
                raise _Reject("missing_image", "the image field is empty")
            if isinstance(payload, str):
                payload = read_file(payload, roots, max_file_bytes)
            check_size(len(payload), max_file_bytes)
            rows.append(Row(key, label, preprocess(payload, image_size, min_image_side, max_image_pixels)))
        except _Reject as r:
            rows.append(Row(key, label, None, r.reason, r.detail))
    return rows


# --------------------------------------------------------------------------------------------------- sources


def _chunked(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _decode_work(params: IngestParams, num_classes: int, roots: tuple[str, ...]) -> Callable[[list], list[Row]]:
    """The decoding of work items; a local path is read only if it lies inside `roots` (`inputs.real_roots`)."""
    return partial(
        _decode_chunk,
        image_size=params.image_size,
        min_image_side=params.min_image_side,
        num_classes=num_classes,
        max_image_pixels=params.max_image_pixels,
        max_file_bytes=params.max_file_bytes,
        roots=roots,
    )


def _synthetic_chunk(indices: list[int], seed: int, num_classes: int, image_size: int) -> list[Row]:
    rows = []
    for index in indices:
        rgb, label = synthetic.draw_image(seed, index, num_classes, image_size)
        rows.append(Row(f"synthetic/{index}", label, encode_png(rgb)))
    return rows


def open_synthetic(params: IngestParams) -> Source:
    p = params.synthetic
    work = partial(_synthetic_chunk, seed=p.seed, num_classes=p.num_classes, image_size=params.image_size)
    info = {
        "kind": "synthetic",
        "seed": p.seed,
        "num_images": p.num_images,
        "generator_version": synthetic.GENERATOR_VERSION,
    }
    return Source(
        list(synthetic.CLASSES[: p.num_classes]), _chunked(range(p.num_images), CHUNK_ROWS), work, p.num_images, info
    )


def open_imagefolder(params: IngestParams) -> Source:
    """torchvision ImageFolder layout: classes = sorted subdirectory names, label = index; files in sorted order."""
    root = Path(params.imagefolder.root)
    if local_input(str(root)) is None:
        raise IngestError(
            f"ingest.imagefolder.root is {NO_INPUT}, which holds no images: put the class folders "
            "under inputs/<name>/, run `dvc add inputs/<name>` and set ingest.imagefolder.root to it"
        )
    if not root.is_dir():
        raise IngestError(
            f"ingest.imagefolder.root = {root}: not a directory; point it at a folder of "
            "<class_name>/ subfolders holding the images"
        )
    try:
        entries = sorted(os.scandir(root), key=lambda d: d.name)
    except OSError as e:
        raise IngestError(
            f"ingest.imagefolder.root = {root}: cannot be listed ({e.strerror}); check its permissions"
        ) from e
    # A linked class folder is not followed (it could lead out of the root): it is counted, not read.
    class_names = [d.name for d in entries if d.is_dir(follow_symlinks=False)]
    items = [
        (f"{d.name}/", None, Skip("symlinked_folder", f"links to {os.path.realpath(d.path)}"))
        for d in entries
        if d.is_symlink() and d.is_dir()
    ]
    for label, name in enumerate(class_names):
        found = list_files(root, root / name, IMAGE_EXTENSIONS)
        if not found:
            raise IngestError(
                f"{root / name}: class folder without images ({', '.join(IMAGE_EXTENSIONS)}); "
                "remove it, or it would become an empty class"
            )
        items += [(key, label, payload) for key, payload in found]
    if not class_names:
        raise IngestError(f"{root}: no class subfolders found; expected {root}/<class_name>/<image files>")
    info = {"kind": "imagefolder", "path": str(root), "files": len(items)}
    work = _decode_work(params, len(class_names), real_roots(root))
    return Source(class_names, _chunked(items, CHUNK_ROWS), work, len(items), info)


def open_hf(params: IngestParams) -> Source:
    """A Hugging Face dataset split, read as `datasets.load_dataset` does (builder -> prepare -> split).

    The builder is kept to record the resolved commit of hub datasets. Labels must be a ClassLabel column: class
    names and num_classes then come from the dataset itself, identically in streaming and map-style mode.
    """
    import datasets
    from huggingface_hub.errors import HfHubHTTPError

    h = params.hf
    path = h.path or h.local_dir
    if h.path is not None and os.path.exists(h.path):
        raise IngestError(
            f"ingest.hf.path = {h.path!r} is a local path, which DVC cannot see there: run `dvc add "
            f"{h.path}`, then set ingest.hf.local_dir: {h.path} and ingest.hf.path: null"
        )
    try:
        builder = datasets.load_dataset_builder(path, h.name, revision=h.revision)
        if h.streaming:
            ds = builder.as_streaming_dataset(split=h.split)
        else:
            builder.download_and_prepare()
            ds = builder.as_dataset(split=h.split)
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError, FileNotFoundError, HfHubHTTPError) as e:
        raise IngestError(
            f"could not load the Hugging Face dataset {h.path or h.local_dir!r} (name={h.name!r}, split={h.split!r}, "
            f"revision={h.revision!r}): {type(e).__name__}: {e}. Fix: check network access (unset HF_HUB_OFFLINE / "
            "HF_DATASETS_OFFLINE, or fill the cache on a connected machine first), set HF_TOKEN and accept the "
            "terms on the dataset page for gated datasets, and check ingest.hf.path / name / revision."
        ) from e
    class_names = _hf_class_names(ds.features, h)
    ds = ds.select_columns([h.image_column, h.label_column]).cast_column(h.image_column, datasets.Image(decode=False))
    rows = itertools.islice(_hf_items(ds, h), h.max_images)
    total = h.max_images if h.streaming else min(len(ds), h.max_images or len(ds))
    info = {
        "kind": "hf",
        "path": h.path,
        "local_dir": local_input(h.local_dir),
        "name": h.name,
        "split": h.split,
        "revision": h.revision,
        "resolved_revision": builder.hash if h.path else None,  # the hub commit sha; dvc.lock pins local_dir
        "streaming": h.streaming,
        "max_images": h.max_images,
        "image_column": h.image_column,
        "label_column": h.label_column,
    }
    # A row without image bytes names a file: read only from the dataset's own directory or the datasets cache.
    roots = real_roots(local_input(h.local_dir), datasets.config.HF_DATASETS_CACHE)
    return Source(class_names, _chunked(rows, CHUNK_ROWS), _decode_work(params, len(class_names), roots), total, info)


def _hf_class_names(features, h: HFParams) -> list[str]:
    import datasets

    source = h.path or h.local_dir
    if features is None:
        raise IngestError(
            f"{source!r}: the dataset's features are unknown (some streaming datasets); "
            "set ingest.hf.streaming: false, or use a dataset whose card declares its features"
        )
    for key, column in (("image_column", h.image_column), ("label_column", h.label_column)):
        if column not in features:
            raise IngestError(f"ingest.hf.{key} = {column!r} is not a column of {source!r}; columns: {list(features)}")
    if not isinstance(features[h.image_column], datasets.Image):
        raise IngestError(f"{source!r}: column {h.image_column!r} is {features[h.image_column]}, not an Image")
    if not isinstance(features[h.label_column], datasets.ClassLabel):
        raise IngestError(
            f"{source!r}: column {h.label_column!r} is {features[h.label_column]}, not a ClassLabel; "
            "class names cannot be known. Cast it first (Dataset.cast_column(col, ClassLabel(names=...)))"
            " and save the dataset, or choose the dataset's ClassLabel column"
        )
    return list(features[h.label_column].names)


def _hf_items(ds, h: HFParams) -> Iterator[tuple[str, int | None, bytes | str | None]]:
    index = 0
    for batch in ds.iter(batch_size=CHUNK_ROWS):
        for image, label in zip(batch[h.image_column], batch[h.label_column]):
            payload = None if image is None else image["bytes"] if image["bytes"] is not None else image["path"]
            yield f"{h.split}/{index}", label, payload
            index += 1


SOURCES = {"synthetic": open_synthetic, "hf": open_hf, "imagefolder": open_imagefolder}


# ---------------------------------------------------------------------------------------------------- output


def _ordered_map(work: Callable, chunks: Iterable[list], num_workers: int) -> Iterator[list[Row]]:
    """`map(work, chunks)`, on `num_workers` processes when > 0, in input order with a bounded look-ahead."""
    if num_workers == 0:
        yield from map(work, chunks)
        return
    pool = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"))
    pending = deque()
    try:
        for chunk in chunks:
            pending.append(pool.submit(work, chunk))
            if len(pending) >= 2 * num_workers:  # never read far ahead of the writer: memory stays bounded
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def ingest(params: IngestParams, out_dir: str | Path) -> dict:
    """Run the ingest stage into `out_dir` (owned by the stage). Returns the metrics: count, skipped."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # until the new one is written, the directory is not valid
    source = SOURCES[params.source](params)
    writer, skipped, seen = ShardWriter(out, params.shard_size), [], 0
    results = _ordered_map(source.work, source.chunks, params.num_workers)
    with closing(results), tqdm(total=source.total, unit="img", desc=f"ingest {params.source}") as bar:
        for rows in results:
            for row in rows:
                if row.png is None:
                    skipped.append({"key": row.key, "reason": row.reason, "detail": row.detail})
                else:
                    writer.add(row)
            seen += len(rows)
            bar.update(len(rows))
            if source.total and len(skipped) > params.max_bad_fraction * source.total:
                break  # failure is already certain: stop reading, report below
    writer.flush()
    _remove_stale_shards(out, {s["file"] for s in writer.shards})
    report = artifacts.atomic_write_json(out / "skipped.json", skipped)
    _check_bad_fraction(len(skipped), seen, params.max_bad_fraction, report)
    count = sum(s["count"] for s in writer.shards)
    by_reason = dict(sorted(Counter(s["reason"] for s in skipped).items()))
    write_images_manifest(
        out,
        count=count,
        image_size=params.image_size,
        class_names=source.class_names,
        source=source.info,
        shards=writer.shards,
        skipped={"count": len(skipped), "by_reason": by_reason},
    )
    print(f"ingest: {count} images in {len(writer.shards)} shards -> {out}; skipped {len(skipped)} {by_reason}")
    return {"count": count, "skipped": len(skipped)}  # the metrics; the rest is in the manifest


def _remove_stale_shards(out: Path, keep: set[str]) -> None:
    for path in out.glob("shard-*.parquet"):
        if path.name not in keep:
            path.unlink()


def _check_bad_fraction(bad: int, seen: int, max_bad_fraction: float, report: Path) -> None:
    if seen == 0:
        raise IngestError("the source yielded no inputs; check the ingest params")
    if bad > max_bad_fraction * seen:
        raise IngestError(
            f"{bad} of {seen} inputs read ({bad / seen:.2%}) were rejected, more than ingest.max_bad_fraction = "
            f"{max_bad_fraction:.2%}; see {report} for each key and reason. Fix the source, or raise "
            "max_bad_fraction if losing these images is acceptable"
        )
