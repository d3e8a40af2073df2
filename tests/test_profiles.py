"""params.yaml and every profile load strictly into every stage's params dataclass."""
import copy
from pathlib import Path

import pytest
import yaml

from pipeline.config import ParamsError, from_dict, read_yaml
from pipeline.profiles import flatten, format_value, load_profile, overrides

REPO = Path(__file__).resolve().parents[1]
PROFILES = sorted(p.stem for p in (REPO / "profiles").glob("*.yaml"))


def sections():
    from pipeline.curve import CurveParams
    from pipeline.data import IngestParams
    from pipeline.encode import EncodeParams
    from pipeline.metrics import EvaluateParams
    from pipeline.reference import ReferenceParams
    from pipeline.registry import RegisterParams
    from pipeline.sample import SampleParams
    from pipeline.tracking import TrackingParams
    from pipeline.train import TrainParams
    from pipeline.vae import VAEParams

    return {"ingest": IngestParams, "vae": VAEParams, "encode": EncodeParams, "train": TrainParams,
            "reference": ReferenceParams, "sample": SampleParams, "evaluate": EvaluateParams,
            "curve": CurveParams, "register": RegisterParams, "tracking": TrackingParams}


def apply(params: dict, flat: dict) -> dict:
    params = copy.deepcopy(params)
    for dotted, value in flat.items():
        *parents, leaf = dotted.split(".")
        node = params
        for key in parents:
            node = node[key]
        node[leaf] = value
    return params


def test_params_yaml_has_exactly_the_known_sections():
    assert set(read_yaml(REPO / "params.yaml")) == set(sections())


@pytest.mark.parametrize("name", ["default", *PROFILES])
def test_every_section_loads(name):
    params = read_yaml(REPO / "params.yaml")
    if name != "default":
        params = apply(params, flatten(load_profile(name, REPO / "profiles"), params))
    for section, cls in sections().items():
        from_dict(cls, params[section], section)


@pytest.mark.parametrize("name", PROFILES)
def test_overrides_round_trip_through_yaml(name):
    """What `dvc exp run -S key=value` receives parses back to the profile's values."""
    flat = flatten(load_profile(name, REPO / "profiles"), read_yaml(REPO / "params.yaml"))
    printed = overrides(name, REPO / "params.yaml", REPO / "profiles")
    assert len(printed) == len(flat)
    for line in printed:
        key, value = line.split("=", 1)
        assert yaml.safe_load(value) == flat[key]


def test_unknown_profile_key_names_the_allowed_ones(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  lrr: 1.0\n")
    with pytest.raises(ParamsError, match="'train.lrr' is not in params.yaml; allowed here: model"):
        overrides("bad", REPO / "params.yaml", tmp_path)
    with pytest.raises(ParamsError, match="unknown profile 'nope'"):
        load_profile("nope", tmp_path)
    with pytest.raises(ParamsError, match="whitespace"):
        format_value("two words")
