"""pipeline/shared_storage.py: a directory published to the cluster's storage (a local S3 server, and a shared
directory) comes back on a node byte for byte, once per node, named by the hash `artifacts.sha256_dir` computes;
a damaged or partial upload is an error, never a silent half copy."""

from __future__ import annotations

import hashlib
import json
import os
import stat
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
    def names(d):
        return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != S.COMPLETE)

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


def hostile(names: list[str], content: bytes = b"planted") -> dict:
    """A COMPLETE record listing `names`, each with `content`: it hashes to its own location name, as an attacker
    who writes to the storage can make it."""
    entry = {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    return {name: entry for name in names}


@pytest.mark.parametrize("name", ["../../../escaped.txt", "/tmp/escaped-absolute.txt", "sub/../../x", "./a", ""])
def test_a_hostile_record_in_a_shared_directory_writes_nothing(tmp_path, monkeypatch, name):
    cache = tmp_path / "node" / "cache"
    monkeypatch.setenv(S.CACHE_ENV, str(cache))
    record = hostile([name])
    location = tmp_path / "shared" / "latents" / S.record_hash(record)
    location.mkdir(parents=True)
    (location / S.COMPLETE).write_text(json.dumps(record))
    (tmp_path / "escaped.txt").write_bytes(b"planted")  # what `../../../escaped.txt` reads from the storage
    downloads = []
    import pyarrow.fs

    monkeypatch.setattr(pyarrow.fs, "copy_files", lambda *a, **kw: downloads.append(a))
    with pytest.raises(ArtifactError, match="not a plain relative path"):
        S.on_this_node(location.as_uri())
    assert downloads == []  # refused before the first byte
    assert not (tmp_path / "node" / "escaped.txt").exists() and not any((cache / "latents").glob("[!.]*"))


def test_a_record_that_is_not_its_locations_name_downloads_nothing(tmp_path, node, monkeypatch):
    shared = tmp_path / "shared"
    uri = S.publish(artifact(tmp_path / "latents"), str(shared), "latents")
    stored = shared / "latents" / uri.rsplit("/", 1)[-1]
    record = json.loads((stored / S.COMPLETE).read_text())
    record["manifest.json"] = hostile(["manifest.json"], b"swapped")["manifest.json"]
    (stored / S.COMPLETE).write_text(json.dumps(record))
    (stored / "manifest.json").write_bytes(b"swapped")
    import pyarrow.fs

    downloads = []
    monkeypatch.setattr(pyarrow.fs, "copy_files", lambda *a, **kw: downloads.append(a))
    with pytest.raises(ArtifactError, match="does not hash to the location's name"):
        S.on_this_node(uri)
    assert downloads == []
    with pytest.raises(ArtifactError, match="not a published location"):
        S.on_this_node(f"{shared.as_uri()}/latents/..")


def test_a_hostile_record_on_s3_writes_nothing(aws_env, tmp_path, node):
    import boto3

    record = hostile(["/etc/planted"])
    client = boto3.client("s3", endpoint_url=aws_env)
    prefix = f"hostile/latents/{S.record_hash(record)}"
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/{S.COMPLETE}", Body=json.dumps(record).encode())
    client.put_object(Bucket=BUCKET, Key=f"{prefix}//etc/planted", Body=b"planted")
    with pytest.raises(ArtifactError, match="not a plain relative path"):
        S.on_this_node(f"s3://{BUCKET}/{prefix}")
    assert not any((node / "latents").glob("[!.]*"))


def test_the_node_cache_is_private_and_refused_when_not(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv(S.CACHE_ENV, str(cache))
    assert S.node_cache() == cache and stat.S_IMODE(cache.stat().st_mode) == 0o700
    cache.chmod(0o755)  # readable by others, writable by no one else: made private again
    assert S.node_cache() == cache and stat.S_IMODE(cache.stat().st_mode) == 0o700
    cache.chmod(0o777)  # a folder anyone can write to: its files could be swapped under the workers
    with pytest.raises(ArtifactError, match="not a private directory of this user.*mode 777"):
        S.node_cache()
    cache.chmod(0o700)
    if os.getuid() == 0:  # root can make a folder that another user owns, as that user could have made it first
        os.chown(cache, 65534, 65534)
        with pytest.raises(ArtifactError, match="owned by uid 65534"):
            S.node_cache()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    monkeypatch.setenv(S.CACHE_ENV, str(link))
    with pytest.raises(ArtifactError, match="not a directory"):
        S.node_cache()


def test_a_damaged_cached_copy_is_downloaded_again(tmp_path, node):
    local = artifact(tmp_path / "latents")
    uri = S.publish(local, str(tmp_path / "shared"), "latents")
    copy = S.on_this_node(uri)
    (copy / "sub" / "shard-0.npy").write_bytes(b"truncated")  # not the recorded size
    assert S.on_this_node(uri) == copy and same_files(local, copy)
    (copy / S.COMPLETE).write_text(json.dumps(hostile(["sub/shard-0.npy"])))  # a record not of this location
    assert S.on_this_node(uri) == copy and same_files(local, copy)
