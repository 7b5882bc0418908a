"""Compute devices and resources for merges: device selection (pure functions, so the CUDA choice is
testable without a GPU), chunk sizes and torch threads, and a sampler of this process's anonymous memory.

The engine only ever moves chunks between the CPU (where inputs are memory-mapped and outputs are written)
and the chosen device, so the CUDA path is `tensor.to(device)` and back, nothing more.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from mergealign.errors import MergeAlignError

_CUDA_RE = re.compile(r"^cuda(?::(\d+))?$")


def choose_device(requested: str | None, *, cuda_available: bool, cuda_count: int) -> str:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a torch device string, or a MergeAlignError saying why not.

    auto = cuda:0 when a CUDA device is visible, else cpu.
    """
    req = (requested or "auto").strip().lower()
    if req == "auto":
        return "cuda:0" if cuda_available and cuda_count > 0 else "cpu"
    if req == "cpu":
        return "cpu"
    m = _CUDA_RE.match(req)
    if not m:
        raise MergeAlignError(f"device {requested!r}: use auto, cpu, cuda or cuda:N")
    if not cuda_available or cuda_count == 0:
        raise MergeAlignError(f"device {requested!r}: no CUDA device is available (use --device cpu or auto)")
    index = int(m.group(1) or 0)
    if index >= cuda_count:
        raise MergeAlignError(
            f"device {requested!r}: only {cuda_count} CUDA device(s) visible (cuda:0..{cuda_count - 1})"
        )
    return f"cuda:{index}"


def resolve_device(requested: str | None = "auto") -> torch.device:
    """choose_device() with what this process actually sees."""
    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    return torch.device(choose_device(requested, cuda_available=available, cuda_count=count))


def default_chunk_elements(device: str | torch.device) -> int:
    """Elements per row chunk for element-wise methods. On CPU 256K (1 MB in float32): the handful of
    float32 temporaries of a chunk stay in L2 across the method's passes, measured ~5x faster than 4M-element
    chunks on a 2-core EPYC, and memory stays flat. On a GPU larger chunks (fewer host<->device transfers)."""
    return (64 << 20) if torch.device(device).type == "cuda" else (256 << 10)


def compute_threads(device: str | torch.device) -> int:
    """torch intra-op threads for a merge on `device`: 1 on CPU unless MERGEALIGN_TORCH_THREADS says otherwise.

    The element-wise work is memory-bound and comes in L2-sized chunks, where a second OpenMP thread gains
    little and loses badly on a shared machine: measured on 2 busy cores (load ~7), 2 threads ran the same
    chunked kernels 3-50x slower than 1 (spinning threads waiting for a descheduled peer). The other core
    is left to the writer thread (os.write, sha256).
    """
    env = os.environ.get("MERGEALIGN_TORCH_THREADS")
    if env:
        return max(1, int(env))
    return 1 if torch.device(device).type == "cpu" else torch.get_num_threads()


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch intra-op threads set to `threads` inside the block (None or 0: left as they are), restored after."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------- memory
def rss_anon_bytes(pid: int | str = "self") -> int:
    """RssAnon of a process (anonymous resident memory: heap, tensors; not the page cache of mmapped files)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakRssAnon:
    """Samples this process's RssAnon every `interval` s on a daemon thread; `.peak` is the maximum seen.

    Linux keeps a high-water mark only for total RSS (VmHWM), which counts the mmapped input pages; anonymous
    memory has none, so it is sampled (a spike shorter than the interval can be missed).
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = rss_anon_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-anon", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_anon_bytes())

    def __enter__(self) -> PeakRssAnon:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_bytes())


def share_cores(workers: int) -> int:
    """Give each of `workers` parallel steps cores // workers torch threads in the child processes it starts
    (generation, lm-eval), unless OMP_NUM_THREADS is set already. torch's OpenMP threads spin-wait: with two
    2-thread workers on 2 cores one generation measured 3.4x the CPU time of a single-threaded one (62 s vs 18 s)."""
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
    return int(os.environ["OMP_NUM_THREADS"])
