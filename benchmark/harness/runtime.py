"""The device a run uses: resolving ``--device``, synchronizing, and reading memory peaks (runner and perf)."""

from __future__ import annotations

import os

import torch

from benchmark.errors import BenchError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks the GPU when there is one; an absent CUDA device is a clear error. ``BENCH_THREADS``
    (``--threads``) sets torch's CPU threads.

    A CUDA device comes back with its index (``cuda`` and ``auto`` name the current one, ``cuda:0``), so that
    one GPU is recorded under one name; and float32 is made to mean float32 there (``exact_float32``).
    """
    threads = os.environ.get("BENCH_THREADS")
    if threads:
        try:
            torch.set_num_threads(int(threads))
        except ValueError:
            raise BenchError(f"BENCH_THREADS={threads!r} is not a number of threads; set it to e.g. 1") from None
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise BenchError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchError(f"--device {name} asked for a CUDA GPU, but torch sees none; use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BenchError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        exact_float32()
    return device


def exact_float32() -> None:
    """Turn TF32 off for cuDNN convolutions and CUDA matmuls.

    PyTorch lets cuDNN run float32 convolutions in TF32 (10-bit mantissa) on Ampere and newer GPUs by
    default. The papers' code ran in float32 on GPUs without TF32, our CPU runs and reference loops compute in
    float32, and TF32 moves a MAML step by more than the GPU tests' float32 tolerance; Omniglot's small
    convolutions are bound by launches, not arithmetic, so exact float32 costs little. ``config.json``
    records both flags (``tf32_convolutions``, ``tf32_matmul``).
    """
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset. CPU: the process's peak resident set so far (a high-water
    mark for the whole process)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_reserved_mb(device: torch.device) -> float | None:
    """CUDA: peak memory held by the caching allocator since the last reset (it counts a CUDA graph's private
    pool, which allocated-memory peaks miss). CPU: None."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**20
    return None


def private_pool_mb(device: torch.device) -> float | None:
    """CUDA: memory the caching allocator holds in private pools, i.e. for CUDA graphs (segments whose
    ``segment_pool_id`` is not the default pool's). It stays reserved while a graph lives, and replays
    allocate nothing, so a graphed step's memory is its warm-up's and capture's, not a timed step's.
    CPU, or a PyTorch whose snapshot lacks pool ids: None."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        segments = torch.cuda.memory_snapshot()
    except (AttributeError, RuntimeError):
        return None
    if any("segment_pool_id" not in seg for seg in segments):
        return None
    return sum(seg["total_size"] for seg in segments
               if seg.get("device", index) == index and tuple(seg["segment_pool_id"]) != (0, 0)) / 2**20


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory a run can still take on ``device``: free GPU memory, or the host's available memory (Linux
    ``MemAvailable``); None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
