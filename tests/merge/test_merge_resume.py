"""Resumable, atomic output: a merge SIGKILLed mid-way and re-run equals an uninterrupted merge byte for byte,
finished shards are kept (not rewritten), and OUT is protected against a different config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mergealign.errors import MergeAlignError
from mergealign.merge import run_merge
from mergealign.writer import PROGRESS_FILE, output_is_finished
from tests.helpers.merge_configs import merge_config
from tests.helpers.models import make_trio

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_trio(tmp_path_factory.mktemp("llama"), "llama")


def config(trio, parameters: dict | None = None, **extra) -> dict:
    params = {"lambda": 0.4} if parameters is None else parameters
    return merge_config(trio, parameters=params, shard_size="24K", **extra)


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def finished_shards(out: Path) -> dict[str, dict]:
    try:
        return json.loads((out / PROGRESS_FILE).read_text())["shards"]
    except (OSError, json.JSONDecodeError, KeyError):
        return {}


def test_sigkill_mid_merge_then_resume_is_byte_identical(llama, tmp_path):
    cfg = config(llama)
    reference = run_merge(cfg, tmp_path / "reference", progress=False)
    n_shards = reference.shards_total
    assert n_shards >= 6

    cfg_path = tmp_path / "merge.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    # Slow the child down (sleep after each tensor) so the kill lands while shards remain to be written.
    env = {**os.environ, "MERGEALIGN_TEST_THROTTLE_S": "0.15"}
    child = subprocess.Popen(
        [sys.executable, "-m", "cli", "merge", str(cfg_path), str(out), "--no-progress"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(finished_shards(out)) < 2 and child.poll() is None:
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()[-2000:] if child.stderr else ""

    done = finished_shards(out)
    assert 2 <= len(done) < n_shards, done
    assert not (out / "model.safetensors.index.json").exists()
    assert not output_is_finished(out)
    kept = {f: (os.stat(out / f).st_ino, os.stat(out / f).st_mtime_ns) for f in done}

    resumed = run_merge(cfg, out, progress=False)
    assert resumed.shards_skipped >= len(done)
    assert resumed.n_tensors < reference.n_tensors
    assert files(out) == files(reference.out_dir)
    for f, (ino, mtime) in kept.items():
        st = os.stat(out / f)
        assert (st.st_ino, st.st_mtime_ns) == (ino, mtime), f"{f} was rewritten"
    assert output_is_finished(out)
    assert not list(out.glob("*.tmp"))


def test_rerun_of_finished_merge_does_nothing(llama, tmp_path):
    first = run_merge(config(llama), tmp_path / "out", progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in first.out_dir.iterdir() if p.name != PROGRESS_FILE}
    again = run_merge(config(llama), tmp_path / "out", progress=False)
    assert again.n_tensors == 0 and again.shards_skipped == again.shards_total
    assert {
        p.name: p.stat().st_mtime_ns for p in again.out_dir.iterdir() if p.name != PROGRESS_FILE
    } == stamps


def test_corrupted_finished_shard_is_redone(llama, tmp_path):
    first = run_merge(config(llama), tmp_path / "out", progress=False)
    reference = files(first.out_dir)
    (first.out_dir / "model.safetensors.index.json").unlink()  # as if killed before the index
    progress = json.loads((first.out_dir / PROGRESS_FILE).read_text())
    progress["complete"] = False
    (first.out_dir / PROGRESS_FILE).write_text(json.dumps(progress))
    victim = sorted(first.out_dir.glob("model-*.safetensors"))[1]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    again = run_merge(config(llama), first.out_dir, progress=False)
    assert again.shards_skipped == again.shards_total - 1
    assert files(first.out_dir) == reference


def test_out_with_another_config_needs_overwrite(llama, tmp_path):
    out = tmp_path / "out"
    run_merge(config(llama), out, progress=False)
    other = config(llama, parameters={"lambda": 0.9})
    with pytest.raises(MergeAlignError, match="different config.*--overwrite"):
        run_merge(other, out, progress=False)
    summary = run_merge(other, out, progress=False, overwrite=True)
    assert summary.n_tensors == summary.n_tensors_total
    reference = run_merge(other, tmp_path / "clean", progress=False)
    assert files(out) == files(reference.out_dir)


def test_foreign_directory_is_not_overwritten(llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(MergeAlignError, match="not a mergealign output"):
        run_merge(config(llama), out, progress=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    run_merge(config(llama), out, progress=False, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes model files only
    assert output_is_finished(out)


def test_two_writers_cannot_share_an_out(llama, tmp_path):
    """While one process holds OUT (a real flock from another process), a second merge into it is refused."""
    out = tmp_path / "out"
    out.mkdir()
    code = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(out / '.mergealign-lock')!r}, os.O_CREAT | os.O_RDWR)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(MergeAlignError, match="being written by another process"):
            run_merge(config(llama), out, progress=False)
    finally:
        holder.kill()
        holder.wait()
    summary = run_merge(config(llama), out, progress=False)  # the lock died with its holder
    assert summary.n_tensors == summary.n_tensors_total and output_is_finished(out)
