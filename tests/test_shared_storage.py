"""pipeline/shared_storage.py: a directory published to the cluster's storage (a local S3 server, and a shared
directory) comes back on a node byte for byte, once per node, named by the hash `artifacts.sha256_dir` computes;
a damaged or partial upload is an error, never a silent half copy."""
from __future__ import annotations

import json
import threading

import pytest

from conftest import BUCKET, keys
from pipeline import shared_storage as S
from pipeline.artifacts import ArtifactError, sha256_dir


def artifact(root):
    root.mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps({"count": 3}))
    (root / "sub").mkdir()
    (root / "sub" / "shard-0.npy").write_bytes(bytes(range(256)) * 64)
    return root


def same_files(a, b) -> bool:
    names = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != S.COMPLETE)
    return names(a) == names(b) and all((a / n).read_bytes() == (b / n).read_bytes() for n in names(a))


@pytest.fixture
def node(tmp_path, monkeypatch):
    """A node's cache of its own."""
    monkeypatch.setenv(S.CACHE_ENV, str(tmp_path / "node-cache"))
    return tmp_path / "node-cache"


def test_a_directory_comes_back_on_a_node_through_s3(aws_env, tmp_path, node):
    local = artifact(tmp_path / "latents")
    uri = S.publish(local, f"s3://{BUCKET}/store", "latents")
    assert uri == f"s3://{BUCKET}/store/latents/{sha256_dir(local)}"  # the name is the content, as DVC hashes it
    stored = sorted(k.rsplit("/", 1)[-1] for k in keys(aws_env, "store/latents/") if not k.endswith("/"))
    assert stored == [S.COMPLETE, "manifest.json", "shard-0.npy"]
    copy = S.on_this_node(uri)
    assert copy == node / "latents" / sha256_dir(local) and same_files(local, copy)
    assert S.publish(local, f"s3://{BUCKET}/store", "latents") == uri  # already there whole: nothing uploaded
    assert S.on_this_node(str(local)) == local  # a driver path stays a path


def test_a_single_file_and_a_shared_directory(tmp_path, node):
    shared = tmp_path / "shared"
    ema = tmp_path / "dit" / "ema.pt"
    ema.parent.mkdir()
    ema.write_bytes(b"weights")
    uri = S.publish(ema, str(shared), "model")
    assert uri.startswith(shared.as_uri() + "/model/")
    assert (S.on_this_node(uri) / "ema.pt").read_bytes() == b"weights"
    with pytest.raises(ValueError, match="absolute directory"):
        S.publish(ema, "relative/dir", "model")
    with pytest.raises(ArtifactError, match="nothing to publish"):
        S.publish(tmp_path / "absent", str(shared), "model")


def test_the_workers_of_a_node_download_once(tmp_path, node, monkeypatch):
    uri = S.publish(artifact(tmp_path / "vae"), str(tmp_path / "shared"), "vae")
    downloads = []
    import pyarrow.fs

    original = pyarrow.fs.copy_files

    def counting(src, dst, **kw):
        downloads.append(src)
        return original(src, dst, **kw)

    monkeypatch.setattr(pyarrow.fs, "copy_files", counting)
    results = []
    threads = [threading.Thread(target=lambda: results.append(S.on_this_node(uri))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 4
    assert len(downloads) == 2  # the two files, once


def test_a_partial_or_damaged_upload_is_an_error(tmp_path, node):
    shared = tmp_path / "shared"
    uri = S.publish(artifact(tmp_path / "latents"), str(shared), "latents")
    stored = shared / "latents" / uri.rsplit("/", 1)[-1]
    (stored / "sub" / "shard-0.npy").write_bytes(b"damaged")
    with pytest.raises(ArtifactError, match="damaged"):
        S.on_this_node(uri)
    assert not any((node / "latents").glob("[!.]*")), "no copy is left to be used"
    (stored / S.COMPLETE).unlink()  # an upload killed before its record
    with pytest.raises(ArtifactError, match="not a whole published artifact"):
        S.on_this_node(uri)
