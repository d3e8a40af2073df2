"""The promotion rule of pipeline.register.decide, case by case."""

import pytest

from pipeline.register import Candidate, decide

P = {
    "num_samples": 1000,
    "sampler": "dpm-solver++",
    "steps": 25,
    "cfg_scale": 1.5,
    "cfg_channels": None,
    "labels": "balanced",
    "extractor": "classifier",
    "extractor_mode": "clean",
    "reference_stats_sha256": "abc",
}


def cand(version, score, **protocol):
    return Candidate(str(version), score, {**P, **protocol})


def test_no_champion_promotes():
    assert decide(cand(1, 10.0), None, "fid").promote


def test_better_promotes_worse_and_equal_do_not():
    champion = cand(1, 10.0)
    assert decide(cand(2, 9.0), champion, "fid").promote
    assert not decide(cand(2, 11.0), champion, "fid").promote
    equal = decide(cand(2, 10.0), champion, "fid")
    assert not equal.promote and "does not beat" in equal.reason


@pytest.mark.parametrize("change", [{"steps": 250}, {"reference_stats_sha256": "other"}, {"num_samples": 50000}])
def test_different_protocol_is_recorded_not_compared(change):
    d = decide(cand(2, 1.0, **change), cand(1, 10.0), "fid")
    assert not d.promote and "protocol differs" in d.reason
    assert next(iter(change)) in d.reason


@pytest.mark.parametrize("score", [None, float("nan"), float("inf")])
def test_missing_metric_never_promotes(score):
    assert not decide(cand(2, score), None, "fid").promote
    assert not decide(cand(2, score), cand(1, 10.0), "fid").promote


def test_protocol_of_compares_the_evaluation_not_the_model_or_the_draw():
    from pipeline.register import PROTOCOL_KEYS, protocol_of

    assert set(P) == set(PROTOCOL_KEYS)
    a = {**P, "sample_seed": 0, "checkpoint_sha256": "c1", "kid_subsets": 10, "kid_subset_size": 500}
    b = {**a, "sample_seed": 1, "checkpoint_sha256": "c2"}
    assert protocol_of(a, "fid") == protocol_of(b, "fid") == P
    assert protocol_of(a, "kid") != protocol_of({**a, "kid_subset_size": 100}, "kid")
    assert protocol_of({}, "fid") == dict.fromkeys(PROTOCOL_KEYS)  # a version without a protocol matches none
