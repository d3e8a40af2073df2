"""Provenance: import closures, the code and package stamp of persisted caches, and local-input placeholders."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import provenance as P

REPO = Path(__file__).resolve().parents[1]


def names(module: str) -> set[str]:
    return {path.relative_to(REPO).as_posix() for path in P.import_closure(module)}


def test_import_closure_follows_every_pipeline_import():
    train = names("pipeline.train")
    assert {"pipeline/train.py", "pipeline/checkpoints.py", "pipeline/diffusion.py", "pipeline/model.py",
            "pipeline/provenance.py"} <= train
    assert "pipeline/report.py" not in train and "pipeline/registry.py" not in train  # not run by training
    assert "pipeline/synthetic.py" in names("pipeline.data")  # `from pipeline import artifacts, synthetic`
    assert "pipeline/provenance.py" in names("pipeline.artifacts")  # imported inside write_manifest (lazily)
    with pytest.raises(ValueError, match="not a module"):
        P.import_closure("pipeline.no_such_module")


def test_stamp_names_what_changed():
    now = P.stamp("pipeline.sample")
    assert "pipeline/sample.py" in now["code"] and set(now["packages"]) == {"python", *P.KEY_PACKAGES}
    assert P.stamp_mismatch(now, P.stamp("pipeline.sample")) == []  # deterministic
    edited = {**now, "code": {**now["code"], "pipeline/diffusion.py": "0" * 64}}
    assert P.stamp_mismatch(edited, now) == ["code changed: pipeline/diffusion.py"]
    upgraded = {**now, "packages": {**now["packages"], "torch": "1.0"}}
    assert P.stamp_mismatch(upgraded, now) == [f"torch 1.0 -> {now['packages']['torch']}"]
    assert "predates" in P.stamp_mismatch(None, now)[0]


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
