"""Provenance every run records: versions of metabench, torch, CUDA and Python, the device, the git commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any


def git_commit() -> str | None:
    """The commit of the metabench source tree, when it is a git checkout (editable installs); else
    ``BENCH_GIT_COMMIT`` when set (a copy of a checkout without its ``.git``, e.g. on a GPU machine, given the
    commit it was copied from); else None."""
    source = Path(__file__).resolve().parents[2]
    given = os.environ.get("BENCH_GIT_COMMIT") or None
    if not (source / ".git").exists() and given:
        return given
    try:
        out = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return given


def cpu_name() -> str:
    """The CPU model ("model name" in /proc/cpuinfo on Linux), else the platform's machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device) -> dict[str, Any]:
    """Versions and hardware that every result row records."""
    import torch

    from benchmark import __version__

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "metabench_version": __version__,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": name,
        "cpu_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        # TF32 keeps 10 mantissa bits in float32 convolutions/matmuls on Ampere and later GPUs (cuDNN
        # convolutions default to it): it changes the numbers, so a result records whether it was on.
        "tf32_convolutions": torch.backends.cudnn.allow_tf32 if device.type == "cuda" else None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None,
    }
