"""Checkpoint (the lead's reader): header-only scan, lazy reads, zero-copy views, fingerprints, refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mergealign.checkpoint import Checkpoint, dtype_from_name
from mergealign.errors import CheckpointError, MergeAlignError
from mergealign.model_refs import parse_model_ref
from tests.helpers.models import load_state_dict, make_model, make_trio


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    return make_trio(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("sharded") / "m", "llama", max_shard_size="40KB")


def test_headers_describe_every_tensor(trio):
    ckpt = Checkpoint(trio.base)
    sd = load_state_dict(trio.base)
    assert set(ckpt.tensors) == set(sd)
    for name, info in ckpt.tensors.items():
        assert info.shape == tuple(sd[name].shape) and info.torch_dtype == sd[name].dtype
        assert info.offset >= 8 and info.nbytes == sd[name].numel() * 2
    assert ckpt.architectures == ["LlamaForCausalLM"] and ckpt.vocab_size == 320
    assert not ckpt.tie_word_embeddings and ckpt.has_chat_template()


def test_get_and_view_read_the_same_values(sharded):
    ckpt = Checkpoint(sharded)
    assert len(ckpt.weight_files) > 2
    sd = load_state_dict(sharded)
    for name in ckpt.tensors:
        view = ckpt.view(name)
        assert torch.equal(view, sd[name]) and torch.equal(ckpt.get(name), sd[name])
        ckpt.prefetch(name)
    ckpt.close()


def test_view_is_file_backed_and_copy_on_write(trio, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(trio.base, d)
    before = (d / "model.safetensors").read_bytes()
    ckpt = Checkpoint(d)
    view = ckpt.view("model.norm.weight")
    view.add_(1)  # private mapping: never reaches the file
    assert (d / "model.safetensors").read_bytes() == before


def test_fingerprints(trio):
    b, e = Checkpoint(trio.base), Checkpoint(trio.expert)
    # fine-tunes share every header, but not their bytes
    assert b.header_fingerprint() == e.header_fingerprint()
    assert b.content_fingerprint() != e.content_fingerprint()
    assert b.content_fingerprint() == Checkpoint(trio.base).content_fingerprint()


def test_pickle_weights_are_refused_unless_allowed(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["X"]}))
    torch.save({"w": torch.ones(2, 3), "h": torch.ones(4, dtype=torch.bfloat16)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle can run code"):
        Checkpoint(d)
    ckpt = Checkpoint(d, allow_pickle=True)
    assert ckpt.tensors["w"].shape == (2, 3) and torch.equal(ckpt.view("w"), torch.ones(2, 3))
    assert len(ckpt.content_fingerprint()) == 64


def test_model_refs_and_dtypes(trio):
    assert parse_model_ref(str(trio.base)).is_local
    ref = parse_model_ref("org/model@v1.0")
    assert (ref.repo_id, ref.revision, ref.is_local) == ("org/model", "v1.0", False)
    with pytest.raises(MergeAlignError):
        parse_model_ref("./no/such/dir")
    assert dtype_from_name("bf16") == torch.bfloat16 and dtype_from_name("F32") == torch.float32
    with pytest.raises(MergeAlignError, match="unknown dtype"):
        dtype_from_name("int4")
