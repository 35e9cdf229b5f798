"""``bench perf``: how fast a learner trains, against the plain per-task loop of the same algorithm."""

from __future__ import annotations

from typing import Any

import click

from benchmark.cli.options import data_dir_option, device_option, override_option, plugin_option


@click.command("perf")
@click.option("--learner", "learner_name", required=True, help="A learner name (see `bench learners`).")
@click.option("--way", type=int, default=5, show_default=True)
@click.option("--shot", type=int, default=1, show_default=True)
@click.option("--query", type=int, default=None, help="Query images per class (default: K, as in finn2017).")
@device_option
@click.option("--iterations", type=int, default=20, show_default=True, help="Timed meta-iterations per variant.")
@click.option("--warmup", type=int, default=5, show_default=True, help="Untimed meta-iterations first (they cover compilation and CUDA-graph capture, which happens at the 4th step).")
@click.option("--reference-iterations", type=int, default=None, help="Timed iterations of the slow reference (default: --iterations); steps are interleaved with the shipped learner's.")
@click.option("--no-reference", is_flag=True, help="Skip the per-task-loop reference.")
@click.option("--ablation", is_flag=True, help="Also time the learner's intermediate variants in the same interleaved "
              "run (for maml: vmap alone, then vmap with each speed switch that is on; add -o compile=true to "
              "include compilation); variants that do not apply here, or equal the shipped one, are listed as skipped.")
@click.option("--eval-episodes", type=int, default=600, show_default=True, help="Test episodes to time evaluation on (0: skip).")
@data_dir_option
@override_option
@plugin_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def perf(learner_name, way, shot, query, device, iterations, warmup, reference_iterations, no_reference, ablation,
         eval_episodes, data_dir, overrides, plugin_files, as_json) -> None:
    """Time meta-training steps of a learner as shipped and of its plain per-task-loop reference.

    \b
    bench perf --learner maml --way 20 --shot 1 --device cuda
    bench perf --learner fomaml --way 20 --shot 1 --json
    bench perf --learner maml --way 5 --shot 1 --ablation

    Reports median ms per meta-iteration, iterations/s and peak memory for both, their ratio, and the time
    to evaluate the test episodes (with the learner's test-time adaptation steps).
    """
    from benchmark.cli.console import print_json
    from benchmark.errors import BenchError
    from benchmark.harness.plan import RunRequest, plan_runs

    if iterations < 1 or warmup < 0:
        raise BenchError("--iterations must be at least 1 and --warmup at least 0")
    request = RunRequest(learner=learner_name, settings={"way": way, "shot": shot, "query": query or shot},
                         overrides=overrides, device=device, data_dir=data_dir, plugin_files=plugin_files)
    plans, session = plan_runs(request)
    report = _measure(plans[0], session, iterations, warmup, reference_iterations or iterations, not no_reference,
                      ablation, eval_episodes)
    if as_json:
        print_json(report)
    else:
        _print(report, warmup)


def _measure(plan: Any, session: Any, iterations: int, warmup: int, reference_iterations: int, reference: bool,
             ablation: bool, eval_episodes: int) -> dict[str, Any]:
    import datetime

    from benchmark.harness.protocol import EpisodeSpec
    from benchmark.harness.provenance import environment
    from benchmark.harness.runner import build_learner
    from benchmark.learner import config_as_dict
    from benchmark.harness.perf import speedups, time_evaluation, time_training, variants_to_time

    s = plan.settings
    shipped = build_learner(plan, session)
    report: dict[str, Any] = {
        "learner": plan.learner, "way": s.way, "shot": s.shot, "query": s.query, "config": config_as_dict(plan.config),
        "describe": shipped.describe(), "implementation": shipped.implementation(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **environment(session.device),
    }
    variants, skipped = variants_to_time(plan.learner_cls, plan.config, shipped.context, shipped,
                                         reference=reference, ablation=ablation)
    if ablation:
        report["skipped_variants"] = skipped
    counts = [reference_iterations if label == "per-task loop" else iterations for label, _ in variants]
    spec = EpisodeSpec(s.way, s.shot, s.query)
    timings = time_training(variants, session.pools.train, spec, counts, warmup, seed=0)
    report["training"] = [t.as_dict() for t in timings]
    speedup = speedups(report["training"], timings)
    if speedup is not None:
        report["speedup"] = speedup
    if eval_episodes > 0:
        report["evaluation"] = time_evaluation(shipped, session.pools.test, spec, eval_episodes)
    return report


def _print(report: dict[str, Any], warmup: int) -> None:
    from rich.table import Table

    from benchmark.cli.console import stdout_console

    console = stdout_console()
    console.print(f"{report['learner']} {report['way']}-way {report['shot']}-shot, {report['query']} query/class, "
                  f"{report['device_name']} ({report['device']}), torch {report['torch_version']}", markup=False)
    # On CUDA a replayed graph allocates nothing, so the graphed variant's peak *allocated* memory looks tiny:
    # what a variant holds is the allocator's reserved memory (graph pools included) over warm-up and steps.
    reserved = any(t.get("peak_reserved_mb") is not None for t in report["training"])
    memory = ("peak reserved MB", "graph pool MB") if reserved else ("peak MB",)
    table = Table("variant", "median ms/iter", "iter/s", *memory, "x loop", "warm-up s")
    for t in report["training"]:
        ratio = f"{t['speedup_vs_loop']:.2f}" if "speedup_vs_loop" in t else "-"
        if reserved:
            held = max((v for v in (t.get("peak_reserved_mb"), t.get("warmup_peak_reserved_mb")) if v is not None),
                       default=None)
            cells = (_mb(held), _mb(t.get("graph_pool_mb")))
        else:
            cells = (_mb(t["peak_memory_mb"]),)
        table.add_row(t["variant"], f"{t['median_ms']:.1f}", f"{t['iterations_per_s']:.2f}", *cells, ratio,
                      f"{t['warmup_s']:.1f}")
    console.print(table)
    console.print(f"warm-up s: {warmup} untimed steps per variant, compilation and CUDA-graph capture included",
                  markup=False)
    for label, why in report.get("skipped_variants", {}).items():
        console.print(f"skipped {label}: {why}", markup=False)
    shipped = report["training"][0]
    console.print(f"sampling a meta-batch of {shipped['batch_size']}: {shipped['sampling_ms']:.2f} ms "
                  f"({100 * shipped['sampling_share']:.1f}% of a meta-iteration)", markup=False)
    if "speedup" in report:
        console.print(f"shipped is {report['speedup']:.2f}x the per-task loop", markup=False)
    if "evaluation" in report:
        e = report["evaluation"]
        console.print(f"evaluation: {e['episodes']} episodes in {e['seconds']:.2f} s ({e['episodes_per_s']:.1f}/s)"
                      + (f"; {e['run_seconds']:.2f} s as a run tests, with the accuracy after each step"
                         if "run_seconds" in e else ""), markup=False)


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
