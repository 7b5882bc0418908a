"""Artifact store: keys, atomic publish with the manifest last, verification, remote (fsspec) roots."""

from __future__ import annotations

import hashlib
import json

import fsspec
import pytest

from mergealign.artifacts import MANIFEST_NAME, ArtifactStore, content_hash, step_key
from mergealign.errors import MergeAlignError


def test_step_key_depends_on_exactly_its_inputs():
    base = dict(inputs={"a": "1"}, shas={"m": "s"}, params={"lambda": 0.5}, code_version="v1")
    key = step_key("merge", **base)
    assert key == step_key("merge", **base)
    assert key == step_key("merge", **{**base, "params": {"lambda": 0.5}})
    # independent reference: sha256 of the canonical JSON document
    doc = {
        "code_version": "v1",
        "inputs": {"a": "1"},
        "params": {"lambda": 0.5},
        "shas": {"m": "s"},
        "step": "merge",
    }
    assert key == hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    for change in (
        {"inputs": {"a": "2"}},
        {"shas": {"m": "t"}},
        {"params": {"lambda": 0.6}},
        {"code_version": "v2"},
    ):
        assert step_key("merge", **{**base, **change}) != key
    assert step_key("similarity", **base) != key


def _build(staging, files):
    for rel, data in files.items():
        p = staging / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def test_publish_verify_and_corruption(tmp_path):
    store = ArtifactStore(tmp_path / "root")
    key = step_key("merge", params={"x": 1}, code_version="t")
    staging = store.staging_dir("merge", key)
    assert staging == store.staging_dir("merge", key)  # deterministic: a killed step finds its partial work
    files = {"model.safetensors": b"\x00" * 1000, "sub/config.json": b"{}"}
    _build(staging, files)
    assert store.lookup("merge", key) is None
    m = store.publish("merge", key, staging, params={"x": 1}, metrics={"n": 2}, code_version="t")
    final = tmp_path / "root" / "merge" / key
    assert m.location == str(final) and not staging.exists()
    assert {f.path: f.sha256 for f in m.files} == {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}
    assert m.content_hash == content_hash("merge", key, m.files)
    on_disk = json.loads((final / MANIFEST_NAME).read_text())
    assert on_disk["key"] == key and on_disk["metrics"] == {"n": 2}
    assert store.lookup("merge", key) == m
    # same size, different bytes: caught by full verification, not by size alone
    (final / "model.safetensors").write_bytes(b"\x01" * 1000)
    assert any("sha256" in p for p in store.verify(m, "full"))
    assert store.verify(m, "none") == []
    assert store.lookup("merge", key) is None
    # a missing file
    (final / "sub" / "config.json").unlink()
    assert any("missing" in p for p in store.verify(m, "none"))


def test_quick_verification_rehashes_only_changed_files(tmp_path):
    store = ArtifactStore(tmp_path)
    key = "k" * 64
    staging = store.staging_dir("s", key)
    _build(staging, {"a.bin": b"abc"})
    m = store.publish("s", key, staging)
    assert store.verify(m, "quick") == []
    (tmp_path / "s" / key / "a.bin").write_bytes(b"abd")  # new mtime -> re-hashed -> caught
    assert store.verify(m, "quick")


def test_directory_without_manifest_is_not_finished(tmp_path):
    store = ArtifactStore(tmp_path)
    key = "a" * 64
    (tmp_path / "merge" / key).mkdir(parents=True)
    (tmp_path / "merge" / key / "model.safetensors").write_bytes(b"half")
    assert store.load("merge", key) is None
    staging = store.staging_dir("merge", key)
    _build(staging, {"model.safetensors": b"whole"})
    m = store.publish("merge", key, staging)  # the stray directory is replaced, never trusted
    assert (tmp_path / "merge" / key / "model.safetensors").read_bytes() == b"whole"
    assert store.lookup("merge", key) == m
    (tmp_path / "merge" / key / MANIFEST_NAME).write_text("{not json")
    assert store.load("merge", key) is None


def test_external_manifest_records_files_in_place(tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text('{"a": 1}')
    store = ArtifactStore(tmp_path / "root")
    m = store.publish_external("models", "k" * 64, model, ["config.json"])
    assert m.external and m.location == str(model.resolve())
    assert store.local_dir(m) == model.resolve()
    assert store.lookup("models", "k" * 64) == m
    (model / "config.json").write_text('{"a": 2}')
    assert store.lookup("models", "k" * 64) is None


def test_remote_store_publish_and_localize(tmp_path):
    url = "memory://mergealign-test-root"
    store = ArtifactStore(url, staging_root=tmp_path / "cache")
    assert not store.is_local
    key = "r" * 64
    staging = store.staging_dir("merge", key)
    assert str(staging).startswith(str(tmp_path / "cache"))
    _build(staging, {"model.safetensors": b"weights", "config.json": b"{}"})
    m = store.publish("merge", key, staging)
    assert m.location == f"memory://mergealign-test-root/merge/{key}"
    fs = fsspec.filesystem("memory")
    assert fs.cat(f"/mergealign-test-root/merge/{key}/model.safetensors") == b"weights"
    assert ArtifactStore(url, staging_root=tmp_path / "cache").lookup("merge", key) == m
    local = store.local_dir(m)
    assert (local / "model.safetensors").read_bytes() == b"weights"
    fs.pipe(f"/mergealign-test-root/merge/{key}/model.safetensors", b"WEIGHTS")
    assert store.lookup("merge", key) is None
    fs.rm("/mergealign-test-root", recursive=True)


def test_unwritable_root_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MergeAlignError, match="artifact root .* is not writable"):
        ArtifactStore(blocker / "root").check_writable()
