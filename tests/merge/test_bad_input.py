"""One test per bad input of issue 2: each gives a clear error naming the culprit, and nothing half-written."""

from __future__ import annotations

import errno
import json
import logging
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergealign.errors import ConfigError, MergeAlignError, PreflightError
from mergealign.merge import run_merge
from tests.helpers.merge_configs import merge_config
from tests.helpers.models import Trio, load_state_dict, make_model, make_trio

EMBED = "model.embed_tokens.weight"
Q0 = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_trio(tmp_path_factory.mktemp("llama"), "llama")


def config(base, expert, aligned, **extra) -> dict:
    return merge_config(Trio(base=base, aligned=aligned, expert=expert), **extra)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite(model_dir: Path, change) -> Path:
    """Apply change(state_dict) to a single-file model and save it back."""
    path = model_dir / "model.safetensors"
    sd = load_file(str(path))
    change(sd)
    save_file(sd, str(path), metadata={"format": "pt"})
    return model_dir


def fails(cfg, out: Path, error=MergeAlignError, **kwargs) -> str:
    with pytest.raises(error) as info:
        run_merge(cfg, out, progress=False, **kwargs)
    assert not out.exists(), "a failed preflight must not create OUT"
    return str(info.value)


# ------------------------------------------------------------------ checkpoint files
def test_missing_weights(llama, tmp_path):
    bad = copy_model(llama.expert, tmp_path / "expert")
    (bad / "model.safetensors").unlink()
    msg = fails(config(llama.base, bad, llama.aligned), tmp_path / "out", MergeAlignError)
    assert str(bad) in msg and "no model weights" in msg


def test_missing_model_directory(llama, tmp_path):
    msg = fails(config(llama.base, tmp_path / "nowhere", llama.aligned), tmp_path / "out", MergeAlignError)
    assert "nowhere" in msg


def test_truncated_safetensors(llama, tmp_path):
    bad = copy_model(llama.expert, tmp_path / "expert")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) - 1000])
    msg = fails(config(llama.base, bad, llama.aligned), tmp_path / "out", MergeAlignError)
    assert "model.safetensors" in msg and "truncated" in msg


def test_corrupt_safetensors_header(llama, tmp_path):
    bad = copy_model(llama.expert, tmp_path / "expert")
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[8:16] = b"#garbage"
    (bad / "model.safetensors").write_bytes(bytes(data))
    msg = fails(config(llama.base, bad, llama.aligned), tmp_path / "out", MergeAlignError)
    assert "model.safetensors" in msg and "corrupt" in msg


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("sharded") / "m", "llama", max_shard_size="60KB")


def test_corrupt_index(llama, sharded, tmp_path):
    bad = copy_model(sharded, tmp_path / "expert")
    (bad / "model.safetensors.index.json").write_text("{ not json")
    msg = fails(config(llama.base, bad, llama.aligned), tmp_path / "out", MergeAlignError)
    assert "model.safetensors.index.json" in msg and "corrupt index" in msg


def test_index_points_to_missing_shard(llama, sharded, tmp_path):
    bad = copy_model(sharded, tmp_path / "expert")
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (bad / shard).unlink()
    msg = fails(config(llama.base, bad, llama.aligned), tmp_path / "out", MergeAlignError)
    assert "missing shard" in msg and shard in msg


# ------------------------------------------------------------------ inputs that do not fit together
def test_shape_mismatch_names_tensor_and_models(llama, tmp_path):
    bad = rewrite(copy_model(llama.expert, tmp_path / "expert"), lambda sd: sd.update({Q0: sd[Q0][:32]}))
    msg = fails(config(llama.base, bad, llama.aligned), tmp_path / "out", PreflightError)
    assert Q0 in msg and "shapes differ" in msg and "domain: (32, 64)" in msg and "base: (64, 64)" in msg


def test_dtype_mismatch_is_an_error_unless_dtype_is_set(llama, tmp_path):
    bad = rewrite(copy_model(llama.expert, tmp_path / "expert"), lambda sd: sd.update({Q0: sd[Q0].half()}))
    msg = fails(config(llama.base, bad, llama.aligned), tmp_path / "out", PreflightError)
    assert Q0 in msg and "dtypes differ" in msg and "domain: F16" in msg and "dtype:" in msg
    summary = run_merge(
        config(llama.base, bad, llama.aligned, dtype="bfloat16"), tmp_path / "cast", progress=False
    )
    assert summary.n_tensors == summary.n_tensors_total


def test_name_mismatch(llama, tmp_path):
    def change(sd):
        sd["model.layers.0.extra.weight"] = torch.zeros(3, dtype=torch.bfloat16)
        del sd["model.norm.weight"]

    bad = rewrite(copy_model(llama.aligned, tmp_path / "aligned"), change)
    msg = fails(config(llama.base, llama.expert, bad), tmp_path / "out", PreflightError)
    assert "'model.norm.weight': in base, missing in alignment" in msg
    assert "'model.layers.0.extra.weight': in alignment, not in base" in msg


def test_all_problems_reported_at_once(llama, tmp_path):
    bad_e = rewrite(copy_model(llama.expert, tmp_path / "expert"), lambda sd: sd.update({Q0: sd[Q0][:32]}))
    bad_a = rewrite(copy_model(llama.aligned, tmp_path / "aligned"), lambda sd: sd.pop("model.norm.weight"))
    with pytest.raises(PreflightError) as info:
        run_merge(config(llama.base, bad_e, bad_a), tmp_path / "out", progress=False)
    assert len(info.value.problems) == 2


def test_architecture_mismatch(llama, tmp_path):
    qwen = make_model(tmp_path / "qwen", "qwen2")
    msg = fails(config(llama.base, llama.expert, qwen), tmp_path / "out", PreflightError)
    assert "architectures differ" in msg and "Qwen2ForCausalLM" in msg
    assert "tie_word_embeddings differ" in msg


def test_vocab_mismatch_under_default_policy_and_merge_shared(llama, tmp_path):
    bigger = make_model(tmp_path / "aligned330", "llama", seed=1, vocab_size=330)
    msg = fails(config(llama.base, llama.expert, bigger), tmp_path / "out", PreflightError)
    assert "vocabulary mismatch" in msg and EMBED in msg and "alignment: 330 rows" in msg
    assert "vocab_policy: merge_shared" in msg

    cfg = config(llama.base, llama.expert, bigger, vocab_policy="merge_shared", vocab_source="alignment")
    cfg["parameters"] = {"preset": "sum"}
    out = tmp_path / "shared"
    run_merge(cfg, out, progress=False)
    merged, b, e, a = (load_state_dict(p) for p in (out, llama.base, llama.expert, bigger))
    for name in (EMBED, "lm_head.weight"):
        assert merged[name].shape == (330, 64)
        assert torch.equal(merged[name][320:], a[name][320:])  # extra rows copied from the vocab source
        shared = (
            b[name].float() + (e[name].float() - b[name].float()) + (a[name][:320].float() - b[name].float())
        )
        assert torch.equal(merged[name][:320], shared.to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 330


def test_nan_and_inf_name_tensor_and_model(llama, tmp_path, caplog):
    def poison(sd):
        sd[Q0][3, 5] = float("nan")
        sd[EMBED][0, 0] = float("inf")

    bad = rewrite(copy_model(llama.expert, tmp_path / "expert"), poison)
    out = tmp_path / "out"
    with pytest.raises(MergeAlignError) as info:
        run_merge(config(llama.base, bad, llama.aligned), out, progress=False)
    msg = str(info.value)
    assert "of domain" in msg and ("NaN" in msg or "Inf" in msg) and "nan_policy" in msg
    assert EMBED in msg or Q0 in msg
    assert not list(out.glob("*.safetensors")) and not list(out.glob("*.tmp"))

    with caplog.at_level(logging.WARNING, logger="mergealign.merge"):
        run_merge(
            config(llama.base, bad, llama.aligned, nan_policy="warn"), tmp_path / "warn", progress=False
        )
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert Q0 in warned and "1 NaN" in warned and EMBED in warned and "1 Inf" in warned


# ------------------------------------------------------------------ config
def test_lambda_out_of_range(llama, tmp_path):
    cfg = config(llama.base, llama.expert, llama.aligned, parameters={"lambda": 1.5})
    msg = fails(cfg, tmp_path / "out", ConfigError)
    assert "parameters.lambda" in msg and "1.5" in msg


def test_density_out_of_range(llama, tmp_path):
    cfg = config(llama.base, llama.expert, llama.aligned)
    cfg["merge_method"] = "ties"
    cfg["models"][1]["parameters"] = {"density": 1.7}
    cfg["parameters"] = {"density": -0.1}
    with pytest.raises(ConfigError) as info:
        run_merge(cfg, tmp_path / "out", progress=False)
    msg = str(info.value)
    assert "models[1].parameters.density" in msg and "1.7" in msg
    assert "parameters.density: must be in (0, 1]" in msg and info.value.exit_code == 2


def test_unknown_method_suggests_closest(llama, tmp_path):
    cfg = config(llama.base, llama.expert, llama.aligned)
    cfg["merge_method"] = "tise"
    msg = fails(cfg, tmp_path / "out", ConfigError)
    assert "unknown method 'tise'" in msg and "did you mean 'ties'" in msg


def test_unknown_config_keys_are_named(llama, tmp_path):
    cfg = config(llama.base, llama.expert, llama.aligned)
    cfg["shard_sise"] = "1G"
    cfg["models"][0]["wieght"] = 1.0
    with pytest.raises(ConfigError) as info:
        run_merge(cfg, tmp_path / "out", progress=False)
    msg = str(info.value)
    assert (
        "shard_sise: unknown field (did you mean 'shard_size'?); known: merge_method, base_model, models,"
        in msg
    )
    assert "models[0].wieght: unknown field; known: model, vector, role, parameters" in msg
    assert len(info.value.problems) == 2


def test_unknown_method_parameter_is_named(llama, tmp_path):
    cfg = config(llama.base, llama.expert, llama.aligned, parameters={"lamda": 0.5})
    msg = fails(cfg, tmp_path / "out", ConfigError)
    assert "parameters.lamda: unknown parameter" in msg and "lambda" in msg


# ------------------------------------------------------------------ disk
@pytest.fixture
def small_fs(tmp_path):
    """A real 2 MB tmpfs (needs root); skipped where mounting is not allowed."""
    mnt = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_not_enough_disk_is_found_by_preflight(llama, small_fs):
    (small_fs / "ballast").write_bytes(b"\0" * (2 * 1024 * 1024 - 64 * 1024))
    out = small_fs / "out"
    msg = fails(config(llama.base, llama.expert, llama.aligned), out, PreflightError)
    assert "not enough free disk" in msg and str(out) in msg


def test_disk_filling_up_mid_write_removes_partial_files(llama, small_fs):
    out = small_fs / "out"

    class FillDisk:
        """After the first tensor, fill the file system up (as another process writing would)."""

        done = False

        def observe(self, name, base, tensors_by_label, merged):
            if self.done:
                return
            self.done = True
            try:
                with open(small_fs / "ballast", "wb") as f:
                    while True:
                        f.write(b"\0" * 4096)
                        f.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC

    with pytest.raises(MergeAlignError, match="disk full") as info:
        run_merge(
            config(llama.base, llama.expert, llama.aligned), out, progress=False, observers=[FillDisk()]
        )
    assert "partial file was removed" in str(info.value)
    left = sorted(p.name for p in out.iterdir())
    assert not [n for n in left if n.endswith((".tmp", ".safetensors"))], left
    assert "model.safetensors.index.json" not in left
