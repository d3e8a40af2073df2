"""The value types and rules that several sections share (precision, attention kernel, FP8, storage path).

They live here, apart from the code that acts on them (numerics.py, attention.py, fp8.py, shared_storage.py), so a
section's schema reaches no torch kernel, Ray or MLflow code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pipeline.params.load import ParamsError

Precision = Literal["fp32", "tf32", "bf16"]


def check_precision(section: str, precision: str, use_gpu: bool) -> None:
    if precision == "tf32" and not use_gpu:
        raise ParamsError(
            f"'{section}.precision' tf32 is a CUDA tensor-core mode and '{section}.use_gpu' is false: "
            f"use fp32 on the CPU, or set {section}.use_gpu: true"
        )


AttentionBackend = Literal["auto", "math", "flash", "efficient", "cudnn"]
CUDA_ONLY = ("efficient", "cudnn")


def check_attention(section: str, backend: str, use_gpu: bool) -> None:
    if backend in CUDA_ONLY and not use_gpu:
        raise ParamsError(
            f"'{section}.attention' {backend} is a CUDA kernel and '{section}.use_gpu' is false: use "
            "auto, math or flash on the CPU"
        )


# Not off/on: YAML 1.1 reads those as booleans, and `dvc exp run -S` writes params.yaml without quotes.
FP8Mode = Literal["none", "float8", "emulate"]


def check_fp8(section: str, mode: str, use_gpu: bool, precision: str) -> None:
    if mode == "float8" and not (use_gpu and precision == "bf16"):
        raise ParamsError(
            f"'{section}.fp8' float8 needs {section}.use_gpu: true and {section}.precision: bf16 (float8 "
            "GEMMs are CUDA tensor-core kernels beside bf16 autocast); use none, or emulate for a "
            "CPU check of the numerics"
        )


def check_storage_path(key: str, storage_path: str) -> None:
    """The rule on a `*.storage_path` param: empty (the driver's paths), a URI, or an absolute directory."""
    if storage_path and "://" not in storage_path and not Path(storage_path).is_absolute():
        raise ParamsError(
            f"'{key}' {storage_path!r} must be a URI (s3://bucket/prefix) or an absolute directory "
            'that every node mounts ("" = the driver\'s own paths)'
        )
