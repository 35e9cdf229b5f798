"""Writing run results: atomic files, the run directory layout, and the provenance every row carries."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterable

#: Files of one run directory.
CONFIG, TRAIN_LOG, EPISODES, SUMMARY, CHECKPOINT, MANIFEST = (
    "config.json", "train_log.csv", "episodes.csv", "summary.json", "checkpoint.pt", "manifest.json",
)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; results are ordinary files
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_write_csv(path: Path, header: list[str], rows: Iterable[Iterable[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def atomic_torch_save(path: Path, obj: Any) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def git_commit() -> str | None:
    """The commit of the metabench source tree, when it is a git checkout (editable installs)."""
    source = Path(__file__).resolve().parents[1]
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
        return None


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


def check_writable(out: Path) -> None:
    """Fail early, before any work, when ``out`` cannot hold results."""
    from benchmark.errors import BenchError

    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BenchError(f"cannot write results to {out} ({exc.strerror or exc}); pass --out to a writable folder") from None
