"""Feature extractors: the classifier (training, determinism, clean-fid interop) and the Inception loading path."""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import pytest
import torch
from cleanfid import fid as cleanfid
from cleanfid.resize import build_resizer
from PIL import Image
from synthetic import make_shapes, save_inception_like, save_tiny_inception

from pipeline import features
from pipeline.artifacts import ArtifactError
from pipeline.features import (
    INCEPTION_FILE,
    SFID_CHANNELS,
    InceptionExtractor,
    WeightsUnavailable,
    load_extractor,
    resolve_inception_weights,
    save_extractor,
    tf_legacy_resize,
)
from pipeline.metrics import fid_from_features
from pipeline.params.reference import ReferenceParams
from pipeline.reference import build_extractor, train_classifier

CPU = torch.device("cpu")


def params(**overrides) -> ReferenceParams:
    base = dict(
        extractor="classifier",
        mode="clean",
        inception_weights="inputs/none",
        classifier_steps=150,
        classifier_batch_size=32,
        classifier_lr=2e-3,
        holdout=100,
        max_features=None,
        batch_size=64,
        use_gpu=False,
        seed=0,
        adm_batch="inputs/none",
    )
    return ReferenceParams(**{**base, **overrides})


@pytest.fixture(scope="module")
def shapes():
    return make_shapes(500, 4, 16, seed=0)


@pytest.fixture(scope="module")
def trained(shapes):
    images, labels = shapes
    return build_extractor(images, labels, 4, params(), CPU)


def write_folder(directory, images):
    directory.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(directory / f"{i:04d}.png")
    return str(directory)


# ---------------------------------------------------------------------------------------------------------------------
# Classifier


def test_classifier_separates_classes(trained):
    extractor, accuracy = trained
    assert accuracy >= 0.9  # 100 held-out images of 4 shape/colour classes
    assert extractor.feature_dim == features.CLASSIFIER_FEATURE_DIM


def test_classifier_training_is_deterministic(shapes):
    images, labels = shapes[0][:64], shapes[1][:64]
    a = train_classifier(images, labels, 4, params(classifier_steps=5)).net.state_dict()
    b = train_classifier(images, labels, 4, params(classifier_steps=5)).net.state_dict()
    c = train_classifier(images, labels, 4, params(classifier_steps=5, seed=1)).net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_features_do_not_depend_on_batch_size(trained, shapes):
    extractor, _ = trained
    images = shapes[0][:50]
    np.testing.assert_allclose(extractor.features(images, 7), extractor.features(images, 50), rtol=1e-5, atol=1e-6)


def test_classifier_plugs_into_cleanfid(trained, shapes, tmp_path):
    """The net is a clean-fid custom_feat_extractor: compute_fid over two folders equals our FID of the features."""
    extractor, _ = trained
    images = shapes[0]
    real, fake = images[:200], images[200:400]
    dir_real, dir_fake = write_folder(tmp_path / "real", real), write_folder(tmp_path / "fake", fake)
    theirs = cleanfid.compute_fid(
        dir_fake,
        dir_real,
        mode="clean",
        custom_feat_extractor=extractor.net,
        custom_fn_resize=lambda x: x.astype(np.float32),  # keep 16 px: no 299 resize
        device=CPU,
        num_workers=0,
        batch_size=64,
        verbose=False,
    )
    f_real, f_fake = extractor.features(real, 64), extractor.features(fake, 64)
    ours = fid_from_features(f_fake, f_real.mean(axis=0), np.cov(f_real, rowvar=False))
    assert ours == pytest.approx(theirs, rel=1e-4)
    # clean-fid's default resize gives 299 px floats; the net brings them back to its own size.
    assert extractor.net(torch.full((2, 3, 299, 299), 128.0)).shape == (2, features.CLASSIFIER_FEATURE_DIM)


def test_save_and_load_round_trip(trained, shapes, tmp_path):
    extractor, _ = trained
    save_extractor(tmp_path, extractor, None)
    loaded = load_extractor(tmp_path, CPU)
    images = shapes[0][:20]
    np.testing.assert_array_equal(loaded.features(images, 20), extractor.features(images, 20))
    np.testing.assert_array_equal(loaded.logits(images, 20), extractor.logits(images, 20))
    state = torch.load(tmp_path / features.CLASSIFIER_FILE, weights_only=True)
    state["head.bias"] += 1
    torch.save(state, tmp_path / features.CLASSIFIER_FILE)
    with pytest.raises(ArtifactError, match="sha256"):
        load_extractor(tmp_path, CPU)


def test_rejects_non_uint8_images(trained):
    with pytest.raises(ValueError, match="uint8"):
        trained[0].features(np.zeros((2, 16, 16, 3), np.float32), 2)


# ---------------------------------------------------------------------------------------------------------------------
# Inception: weights resolution, and the loading path on a tiny TorchScript stand-in with the real one's interface


@pytest.fixture
def tiny_inception(tmp_path):
    return save_tiny_inception(tmp_path / "weights" / INCEPTION_FILE, seed=0)


def test_missing_weights_fail_fast_with_instructions(tmp_path, monkeypatch):
    t0 = time.time()
    with pytest.raises(WeightsUnavailable, match="reference.inception_weights"):
        resolve_inception_weights(str(tmp_path / INCEPTION_FILE))
    # No param and no file at clean-fid's location: one download try with a timeout, then the same advice.
    monkeypatch.setattr(features, "cleanfid_weights_path", lambda: tmp_path / "cache" / INCEPTION_FILE)
    monkeypatch.setattr(features, "INCEPTION_URL", "http://127.0.0.1:9/inception-2015-12-05.pt")
    with pytest.raises(WeightsUnavailable, match="offline machine.*reference.inception_weights"):
        resolve_inception_weights(None)
    assert not (tmp_path / "cache" / INCEPTION_FILE).exists()
    assert time.time() - t0 < 10


def test_weights_file_must_keep_cleanfid_name(tiny_inception, tmp_path):
    renamed = tmp_path / "inception.pt"
    renamed.write_bytes(tiny_inception.read_bytes())
    with pytest.raises(WeightsUnavailable, match="rename it"):
        resolve_inception_weights(str(renamed))
    assert resolve_inception_weights(str(tiny_inception.parent)) == tiny_inception  # a directory works too


@pytest.mark.parametrize("mode", ["clean", "legacy_tensorflow"])
def test_inception_follows_cleanfid_protocol(tiny_inception, tmp_path, mode):
    """Features equal clean-fid's own folder pipeline (its resizer, its InceptionV3W) on the same weights;
    logits are the output layer without bias."""
    images = make_shapes(6, 4, 16, seed=1)[0]
    extractor = InceptionExtractor(resolve_inception_weights(str(tiny_inception)), mode, CPU)
    ours = extractor.extract(images, 4)
    theirs = cleanfid.get_folder_features(
        write_folder(tmp_path / "imgs", images),
        extractor.model,
        num_workers=0,
        batch_size=4,
        device=CPU,
        mode=mode,
        verbose=False,
    )
    np.testing.assert_allclose(ours.features, theirs, rtol=1e-4, atol=1e-4)
    weight = torch.jit.load(str(tiny_inception)).output.weight.detach().numpy()
    np.testing.assert_allclose(ours.logits, ours.features @ weight.T, rtol=1e-4, atol=1e-4)
    if mode == "clean":  # the resize happens outside the net, with clean-fid's PIL bicubic
        assert build_resizer("clean")(images[0]).shape == (299, 299, 3)


def test_inception_extractor_round_trip_checks_the_weights(tiny_inception, tmp_path):
    extractor = InceptionExtractor(tiny_inception, "clean", CPU)
    save_extractor(tmp_path / "ref", extractor, str(tiny_inception))
    images = make_shapes(3, 4, 16, seed=2)[0]
    np.testing.assert_array_equal(
        load_extractor(tmp_path / "ref", CPU).features(images, 3), extractor.features(images, 3)
    )
    other = save_tiny_inception(tmp_path / "other" / INCEPTION_FILE, seed=1)
    with pytest.raises(ArtifactError, match="sha256"):
        load_extractor(tmp_path / "ref", CPU, inception_weights=str(other))


# ---------------------------------------------------------------------------------------------------------------------
# sFID's spatial features: the tap of layers.mixed_6.conv, on a net with the TorchScript port's layer names


def test_tf_legacy_resize_reads_the_input_at_dst_times_scale():
    """TF1's resize_bilinear(align_corners=False): output i reads the input at i * H / size, clamped at the border."""
    x = torch.arange(4.0).reshape(1, 1, 1, 4).expand(1, 1, 4, 4)  # column index as value
    out = tf_legacy_resize(x, 6)[0, 0, 0]  # reads at 0, 2/3, 4/3, 2, 8/3, 10/3 -> clamped to 3 at the border
    np.testing.assert_allclose(out.numpy(), [0, 2 / 3, 4 / 3, 2, 8 / 3, 3], atol=1e-6)


@pytest.mark.parametrize("mode", ["legacy_tensorflow", "clean"])
def test_spatial_features_are_mixed_6_conv_first_7_channels_in_nhwc_order(tmp_path, mode):
    weights = save_inception_like(tmp_path / INCEPTION_FILE, seed=0)
    extractor = InceptionExtractor(weights, mode, CPU)
    assert extractor.spatial_unavailable() is None
    images = make_shapes(3, 4, 32, seed=3)[0]
    out = extractor.extract(images, 2, spatial=True)
    np.testing.assert_array_equal(out.features, extractor.extract(images, 2).features)  # the pool3 path is untouched
    layers = torch.jit.load(str(weights)).layers
    x = extractor._to_tensor(images)
    h = tf_legacy_resize(x, 299) if mode == "legacy_tensorflow" else x
    h = (h - 128) / 128
    for name in (
        "conv",
        "conv_1",
        "conv_2",
        "pool0",
        "conv_3",
        "conv_4",
        "pool1",
        "mixed",
        "mixed_1",
        "mixed_2",
        "mixed_3",
        "mixed_4",
        "mixed_5",
    ):
        h = getattr(layers, name)(h)
    with torch.no_grad():
        tap = layers.mixed_6.conv(h).double().numpy()  # (N, 12, 17, 17)
    assert out.spatial.shape == (3, 17 * 17 * SFID_CHANNELS)
    n, c, y, x_ = 1, 5, 3, 11  # ADM flattens NHWC: index (y * 17 + x) * 7 + c
    assert out.spatial[n, (y * 17 + x_) * SFID_CHANNELS + c] == pytest.approx(tap[n, c, y, x_], rel=1e-4, abs=1e-5)
    np.testing.assert_allclose(
        out.spatial, tap[:, :SFID_CHANNELS].transpose(0, 2, 3, 1).reshape(3, -1), rtol=1e-4, atol=1e-5
    )  # batches of 2 vs 3: float sums differ


def test_spatial_replay_that_misses_the_nets_resize_is_an_error(tmp_path):
    """A net that resizes with half-pixel centres: replaying TF's resize would tap other features, and says so."""
    extractor = InceptionExtractor(
        save_inception_like(tmp_path / INCEPTION_FILE, 0, half_pixel=True), "legacy_tensorflow", CPU
    )
    with pytest.raises(features.SpatialReplayMismatch, match="replayed input path"):
        extractor.extract(make_shapes(2, 4, 32, seed=3)[0], 2, spatial=True)


def test_spatial_features_unavailable_say_why(tiny_inception, trained):
    assert "no layers.mixed_6.conv" in InceptionExtractor(tiny_inception, "clean", CPU).spatial_unavailable()
    assert "classifier extractor has none" in trained[0].spatial_unavailable()
    with pytest.raises(ValueError, match="has none"):
        trained[0].extract(make_shapes(2, 4, 16, seed=0)[0], 2, spatial=True)


def test_the_weights_hashed_are_the_weights_loaded(tiny_inception, tmp_path):
    """One read: the hash recorded is of the bytes the net was built from, whatever the path holds afterwards."""
    loaded = hashlib.sha256(tiny_inception.read_bytes()).hexdigest()
    extractor = InceptionExtractor(tiny_inception, "clean", CPU)
    save_inception_like(tiny_inception, 1)  # the file is swapped after the load
    assert extractor.config()["weights_sha256"] == loaded
    (tmp_path / "ref").mkdir()
    save_extractor(tmp_path / "ref", extractor, str(tiny_inception))
    with pytest.raises(ArtifactError, match="the reference used"):
        load_extractor(tmp_path / "ref", CPU)


def test_weights_that_another_user_could_have_planted_are_refused(tiny_inception, tmp_path):
    shared = tmp_path / "shared-tmp"
    shared.mkdir()
    shared.chmod(0o1777)  # as /tmp, where clean-fid keeps its copy
    planted = shared / INCEPTION_FILE
    planted.write_bytes(tiny_inception.read_bytes())
    planted.chmod(0o666)  # anyone may rewrite it
    with pytest.raises(WeightsUnavailable, match="other users can write to"):
        InceptionExtractor(planted, "clean", CPU)
    planted.chmod(0o644)
    InceptionExtractor(planted, "clean", CPU)  # this user's own file there is fine
    if os.getuid() == 0:  # root can give it to another user, who could have put it there first
        os.chown(planted, 65534, 65534)
        with pytest.raises(WeightsUnavailable, match="owned by uid 65534"):
            InceptionExtractor(planted, "clean", CPU)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / INCEPTION_FILE).write_bytes(tiny_inception.read_bytes())
    (private / INCEPTION_FILE).chmod(0o666)  # in a folder only this user writes, the file's own mode matters not
    InceptionExtractor(private / INCEPTION_FILE, "clean", CPU)
