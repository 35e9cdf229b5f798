"""Shared fixtures: the real Omniglot when it is present (else those tests skip), fake trees, and (from
slurm_cluster.py) a real local Slurm cluster for tests marked `slurm`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The `slurm_cluster` fixture (a real local Slurm cluster for tests marked `slurm`); imported so pytest sees it.
from slurm_cluster import slurm_cluster  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def real_data_dir() -> Path | None:
    """``BENCH_TEST_OMNIGLOT``, else ``../shared/data/omniglot`` beside the checkout, if it holds the zips."""
    candidates = [os.environ.get("BENCH_TEST_OMNIGLOT"), REPO.parent / "shared" / "data" / "omniglot"]
    for c in candidates:
        if c and (Path(c) / "images_background.zip").is_file() and (Path(c) / "images_evaluation.zip").is_file():
            return Path(c)
    return None


def pytest_collection_modifyitems(config, items):
    """Skip ``gpu`` tests where CUDA is absent (imports torch only when such a test was collected), and
    ``inductor`` tests unless BENCH_TEST_INDUCTOR=1."""
    if os.environ.get("BENCH_TEST_INDUCTOR") != "1":
        skip = pytest.mark.skip(reason="minutes of inductor compilation: set BENCH_TEST_INDUCTOR=1 to run it")
        for item in items:
            if item.get_closest_marker("inductor"):
                item.add_marker(skip)
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (run on a GPU machine: python -m pytest -m gpu)")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def omniglot_dir() -> Path:
    path = real_data_dir()
    if path is None:
        pytest.skip("real Omniglot not found: set BENCH_TEST_OMNIGLOT or place it in ../shared/data/omniglot")
    return path


@pytest.fixture(scope="session")
def omniglot(omniglot_dir):
    """The real data set, decoded once (cached in the user's cache dir, or BENCH_CACHE_DIR)."""
    from benchmark.harness.data import load_omniglot

    return load_omniglot(omniglot_dir)


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """An empty cache directory, with BENCH_DATA_DIR unset, so data lookup starts from nothing."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("BENCH_CACHE_DIR", str(cache))
    monkeypatch.delenv("BENCH_DATA_DIR", raising=False)
    return cache


#: The smallest real runs that still have every file a figure reads: two logged iterations, each validated;
#: MAML with one test-time adaptation step (steps.csv); two seeds of the (cheaper) fine-tune baseline for the
#: seed band, and a learner without adaptation steps. Shared by the figure and report tests.
TINY_RUN = ["--way", "5", "--shot", "1", "--query", "2", "--iterations", "2", "--episodes", "4", "--val-every", "1",
            "--val-episodes", "2", "--log-every", "1", "--checkpoint-every", "2", "--device", "cpu", "-q"]
TINY_LEARNERS = {
    "maml": ["-o", "meta_batch_size=1", "-o", "test_inner_steps=1"],
    "finetune": ["-o", "batch_size=8", "-o", "head_epochs=1", "--seed", "0", "--seed", "1"],
}


@pytest.fixture(scope="session")
def tiny_results(omniglot_dir, tmp_path_factory) -> Path:
    """A results folder of real tiny runs: maml seed 0 (with steps.csv), finetune seeds 0 and 1."""
    from benchmark.cli import main

    out = tmp_path_factory.mktemp("tiny-results")
    for learner, extra in TINY_LEARNERS.items():
        code = main(["run", "--learner", learner, *TINY_RUN, *extra, "--data-dir", str(omniglot_dir), "--out", str(out)])
        assert code == 0, f"bench run --learner {learner} failed"
    return out
