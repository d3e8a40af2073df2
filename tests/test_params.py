from dataclasses import dataclass, field
from typing import Literal

import pytest

from pipeline.params.load import ParamsError, from_dict, load_section, to_dict


@dataclass(frozen=True)
class Inner:
    path: str
    revision: str | None


@dataclass(frozen=True)
class Section:
    lr: float
    steps: int
    flip: bool
    sampler: Literal["ddpm", "ddim"]
    channels: tuple[int, ...]
    clip: float | None
    inner: Inner


GOOD = {
    "lr": 1e-4,
    "steps": 10,
    "flip": True,
    "sampler": "ddpm",
    "channels": [32, 64],
    "clip": None,
    "inner": {"path": "x", "revision": None},
}


def test_round_trip():
    params = from_dict(Section, GOOD, "train")
    assert params.channels == (32, 64) and params.inner.path == "x"
    assert to_dict(params) == {**GOOD, "channels": [32, 64]}
    assert isinstance(from_dict(Section, {**GOOD, "lr": 1}, "train").lr, float)  # ints are valid floats


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lrr": 1.0}, "unknown key 'train.lrr'"),
        ({"steps": 1.5}, "'train.steps' must be an integer"),
        ({"steps": True}, "'train.steps' must be an integer"),
        ({"flip": "yes"}, "'train.flip' must be bool"),
        ({"sampler": "dpm"}, "'train.sampler' must be one of ['ddpm', 'ddim']"),
        ({"lr": "1e-4"}, "write 1.0e-4"),
        ({"channels": [32, "a"]}, "'train.channels[1]' must be an integer"),
        ({"inner": {"path": "x", "revision": None, "extra": 1}}, "unknown key 'train.inner.extra'"),
        ({"inner": {"path": "x", "revision": 3}}, "'train.inner.revision' must be str"),
    ],
)
def test_bad_values_name_the_key(change, message):
    with pytest.raises(ParamsError) as e:
        from_dict(Section, {**GOOD, **change}, "train")
    assert message in str(e.value)


def test_missing_key_and_section(tmp_path):
    bad = dict(GOOD)
    del bad["steps"]
    with pytest.raises(ParamsError, match="missing key 'train.steps'"):
        from_dict(Section, bad, "train")
    path = tmp_path / "params.yaml"
    path.write_text("other: {}\n")
    with pytest.raises(ParamsError, match="missing section 'train'"):
        load_section(Section, "train", path)


def test_unknown_key_lists_allowed():
    with pytest.raises(ParamsError, match="allowed keys in 'train': lr, steps, flip"):
        from_dict(Section, {**GOOD, "bogus": 1}, "train")


def test_structural_defaults_allowed():
    @dataclass(frozen=True)
    class WithDefault:
        inner: Inner = field(default_factory=lambda: Inner("a", None))

    assert from_dict(WithDefault, {}, "s").inner.path == "a"
