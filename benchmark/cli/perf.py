"""``bench perf``: how fast a learner trains, against the plain per-task loop of the same algorithm."""

from __future__ import annotations

import click

from benchmark.cli.common import override_option, plugin_option
from benchmark.cli.data import data_dir_option


@click.command("perf")
@click.option("--learner", "learner_name", required=True, help="A learner name (see `bench learners`).")
@click.option("--way", type=int, default=5, show_default=True)
@click.option("--shot", type=int, default=1, show_default=True)
@click.option("--query", type=int, default=None, help="Query images per class (default: K, as in finn2017).")
@click.option("--device", type=str, default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
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
    import datetime

    from benchmark.cli.console import print_json, stdout_console
    from benchmark.config import apply_overrides
    from benchmark.data import load_omniglot
    from benchmark.errors import BenchError, ConfigError
    from benchmark.learner import RunContext
    from benchmark.perf import time_evaluation, time_training
    from benchmark.plugins import load_registry
    from benchmark.protocol import ClassPool, EpisodeSpec, get_protocol
    from benchmark.results import environment
    from benchmark.runner import resolve_device

    if iterations < 1 or warmup < 0:
        raise BenchError("--iterations must be at least 1 and --warmup at least 0")
    learner_cls = load_registry(plugin_files).get(learner_name)
    config = apply_overrides(learner_cls.default_config(way, shot), list(overrides))
    spec = EpisodeSpec(way, shot, query if query is not None else shot)
    spec.validate()
    dev = resolve_device(device)
    data = load_omniglot(data_dir)
    protocol = get_protocol("vinyals")
    train_pool, test_pool = ClassPool(data, protocol, "train", dev), ClassPool(data, protocol, "test", dev)
    context = RunContext(way=way, shot=shot, query=spec.query, device=dev, seed=0,
                         num_train_classes=train_pool.num_classes)

    shipped = learner_cls(config, context)
    report: dict = {
        "learner": learner_name, "way": way, "shot": shot, "query": spec.query, "config": config.__dict__,
        "describe": shipped.describe(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **environment(dev),
    }
    variants = [("shipped", shipped)]
    counts = [iterations]
    ref_config = None if no_reference else learner_cls.reference_config(config)
    if ref_config is not None:
        variants.append(("per-task loop", learner_cls(ref_config, context)))
        counts.append(reference_iterations or iterations)
    if ablation:
        report["skipped_variants"] = {}
        for label, ablation_config in learner_cls.ablation_configs(config).items():
            try:
                learner = learner_cls(ablation_config, context)
            except ConfigError as exc:  # e.g. a CUDA graph on the CPU
                report["skipped_variants"][label] = str(exc)
                continue
            if learner.describe() == shipped.describe():
                report["skipped_variants"][label] = "the same as shipped on this device"
                continue
            variants.append((label, learner))
            counts.append(iterations)
    timings = time_training(variants, train_pool, spec, counts, warmup, seed=0)
    report["training"] = [t.as_dict() for t in timings]
    if ref_config is not None:  # every variant's speed-up over the loop, from the same interleaved run
        loop_ms = timings[1].median_ms
        for row, timing in zip(report["training"], timings):
            row["speedup_vs_loop"] = round(loop_ms / timing.median_ms, 2)
        report["speedup"] = report["training"][0]["speedup_vs_loop"]
    if eval_episodes > 0:
        report["evaluation"] = time_evaluation(shipped, test_pool, spec, eval_episodes)

    if as_json:
        print_json(report)
        return
    from rich.table import Table

    console = stdout_console()
    console.print(f"{learner_name} {way}-way {shot}-shot, {spec.query} query/class, {report['device_name']} "
                  f"({report['device']}), torch {report['torch_version']}", markup=False)
    table = Table("variant", "median ms/iter", "iter/s", "peak MB", "x loop", "warm-up s")
    for t in report["training"]:
        ratio = f"{t['speedup_vs_loop']:.2f}" if "speedup_vs_loop" in t else "-"
        table.add_row(t["variant"], f"{t['median_ms']:.1f}", f"{t['iterations_per_s']:.2f}",
                      f"{t['peak_memory_mb']:.0f}", ratio, f"{t['warmup_s']:.1f}")
    console.print(table)
    console.print(f"warm-up s: {warmup} untimed steps per variant, compilation and CUDA-graph capture included",
                  markup=False)
    for label, why in report.get("skipped_variants", {}).items():
        console.print(f"skipped {label}: {why}", markup=False)
    shipped_t = report["training"][0]
    console.print(f"sampling a meta-batch of {shipped_t['batch_size']}: {shipped_t['sampling_ms']:.2f} ms "
                  f"({100 * shipped_t['sampling_share']:.1f}% of a meta-iteration)", markup=False)
    if "speedup" in report:
        console.print(f"shipped is {report['speedup']:.2f}x the per-task loop", markup=False)
    if "evaluation" in report:
        e = report["evaluation"]
        console.print(f"evaluation: {e['episodes']} episodes in {e['seconds']:.2f} s ({e['episodes_per_s']:.1f}/s)",
                      markup=False)
