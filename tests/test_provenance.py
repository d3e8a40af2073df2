"""Provenance: the code and package stamp of persisted caches, and local-input placeholders."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import provenance as P
from pipeline.code_stamp import stamp, stamp_mismatch
from pipeline.fingerprint import fingerprint

REPO = Path(__file__).resolve().parents[1]


def test_stamp_names_what_changed():
    now = stamp("sample")
    assert "pipeline/sample.py" in now["code"] and set(now["packages"]) == {"python", *P.KEY_PACKAGES}
    assert stamp_mismatch(now, stamp("sample")) == []  # deterministic
    assert now["fingerprint"] == fingerprint("sample")["fingerprint"]  # the one DVC sees in fingerprints/sample.json
    edited = {**now, "fingerprint": "0" * 64, "code": {**now["code"], "pipeline/diffusion.py": "0" * 64}}
    assert stamp_mismatch(edited, now) == ["code changed: pipeline/diffusion.py"]
    assert stamp_mismatch({**now, "code": edited["code"]}, now) == []  # the fingerprint decides
    upgraded = {**now, "packages": {**now["packages"], "torch": "1.0"}}
    assert stamp_mismatch(upgraded, now) == [f"torch 1.0 -> {now['packages']['torch']}"]
    assert "predates" in stamp_mismatch(None, now)[0]


def test_local_input_placeholder():
    assert P.local_input(P.NO_INPUT) is None and P.local_input("inputs/none/") is None and P.local_input(None) is None
    assert P.local_input("inputs/faces") == "inputs/faces"
    assert (REPO / P.NO_INPUT).is_dir()  # committed, so the dvc.yaml deps that name it exist in every checkout


def test_machine_names_the_cpu_its_kernel_flags_and_torch():
    import torch

    from pipeline.provenance import CPU_FLAGS, machine

    m = machine()
    assert m["cpu"] and set(m["cpu_flags"]) <= set(CPU_FLAGS)
    assert m["threads"] == torch.get_num_threads() and m["torch"] == torch.__version__
    if not Path("/proc/cpuinfo").exists():
        pytest.skip("no /proc/cpuinfo: the flags are only read on Linux")
    flags = Path("/proc/cpuinfo").read_text().split()
    assert all((f in flags) == (f in m["cpu_flags"]) for f in CPU_FLAGS)
