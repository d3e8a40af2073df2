"""params.yaml and every profile pass every check a stage makes on its params, in one place
(`pipeline.profiles.validate`): strict types, each section's cross-field rules, and the GPU rule across sections."""

from pathlib import Path

import pytest
import yaml

from pipeline.params.load import ParamsError, read_yaml
from pipeline.profiles import apply, flatten, format_value, load_profile, main, overrides, section_classes, validate

REPO = Path(__file__).resolve().parents[1]
PROFILES = sorted(p.stem for p in (REPO / "profiles").glob("*.yaml"))


def resolved(name: str) -> dict:
    params = read_yaml(REPO / "params.yaml")
    return params if name == "default" else apply(params, flatten(load_profile(name, REPO / "profiles"), params))


def test_params_yaml_has_exactly_the_known_sections():
    assert set(read_yaml(REPO / "params.yaml")) == set(section_classes())


@pytest.mark.parametrize("name", ["default", *PROFILES])
def test_every_profile_validates_completely(name):
    loaded = validate(resolved(name), name)
    assert set(loaded) == set(section_classes())


@pytest.mark.parametrize("name", PROFILES)
def test_overrides_round_trip_through_yaml(name):
    """What `dvc exp run -S key=value` receives parses back to the profile's values."""
    flat = flatten(load_profile(name, REPO / "profiles"), read_yaml(REPO / "params.yaml"))
    printed = overrides(name, REPO / "params.yaml", REPO / "profiles")
    assert len(printed) == len(flat)
    for line in printed:
        key, value = line.split("=", 1)
        assert yaml.safe_load(value) == flat[key]


@pytest.mark.parametrize("name", ["imagenet256", "official-xl2"])
def test_paper_profiles_run_the_official_numerics(name):
    params = resolved(name)
    assert params["sample"]["precision"] == "tf32" and params["sample"]["cfg_channels"] == 3
    assert params["reference"]["adm_batch"].endswith("VIRTUAL_imagenet256_labeled.npz")
    if not params["train"]["official_checkpoint"]:
        assert params["train"]["precision"] == "tf32" and params["train"]["warmup_steps"] == 0


BAD = {  # a profile that breaks one rule -> the key the error must name
    "sample:\n  micro_batch: 32\n  shard_size: 100\n": "'sample.shard_size'",
    "train:\n  global_batch_size: 30\n  num_workers: 4\n": "'train.global_batch_size'",
    "train:\n  precision: tf32\n": "'train.precision' tf32",
    "curve:\n  num_samples: 1\n": "'curve.num_samples'",
    "reference:\n  adm_batch: x.npz\n": "'reference.adm_batch'",
    # a GPU profile that forgets a stage: the curve would sample on the CPU
    "encode:\n  use_gpu: true\ntrain:\n  use_gpu: true\nreference:\n  use_gpu: true\nsample:\n  use_gpu: true\n"
    "evaluate:\n  use_gpu: true\n": "'curve.use_gpu' false",
    # a model bigger than the CPU presets is a GPU profile too
    "train:\n  model: DiT-XL/2\n": "'encode.use_gpu' false",
}


@pytest.mark.parametrize("text,key", BAD.items(), ids=[k for k in BAD.values()])
def test_bad_profiles_fail_naming_the_key(tmp_path, text, key):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        overrides("bad", REPO / "params.yaml", tmp_path)


def test_official_checkpoint_leaves_train_and_curve_on_the_cpu():
    """With an official checkpoint, train only copies weights and curve has nothing to score."""
    params = resolved("official-xl2")
    assert not params["train"]["use_gpu"] and not params["curve"]["use_gpu"]
    validate(params, "official-xl2")
    params["train"]["official_checkpoint"] = "inputs/none"
    with pytest.raises(ParamsError, match=r"'train\.use_gpu' false"):
        validate(params, "official-xl2 trained")


def test_cli_prints_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit, match=r"^error: .*'sample\.shard_size'"):
        monkeypatch.setattr("pipeline.profiles.PROFILE_DIR", tmp_path)
        (tmp_path / "bad.yaml").write_text("sample:\n  shard_size: 100\n")
        main(["bad"])


def test_unknown_profile_key_names_the_allowed_ones(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  lrr: 1.0\n")
    with pytest.raises(ParamsError, match="'train.lrr' is not in params.yaml; allowed here: model"):
        overrides("bad", REPO / "params.yaml", tmp_path)
    with pytest.raises(ParamsError, match="unknown profile 'nope'"):
        load_profile("nope", tmp_path)
    with pytest.raises(ParamsError, match="whitespace"):
        format_value("two words")
