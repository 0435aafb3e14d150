"""Ray against one process: the same 8-step study serially and on a local Ray, in one run.

The study is two cells (digits, MLP 64 and 128, mean-field), one pair of seeds, W2 matching:
4 trainings, 2 matches, 2 evaluations. The serial run executes them one after another in this
process; the Ray run on a local Ray with one task per core. Each runs on a fresh cache, twice:
the first run of each pays its processes' first calls of torch, Pyro and the solver (in every
Ray worker), the second does not. Ray's
start-up is timed on its own: ``ray.init`` and then a warm-up task per core, in which a fresh
worker imports torch, Pyro and bnn_align and loads the data (what a serial run has done before
it starts); the speed-up is reported with and without it.
Ray's overhead on a one-step study: one training step run by the same scheduler serially and
as a Ray task (Ray already started, its workers warm).

    python benchmarks/bench_sweep.py [--epochs 40] [--cpus 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _record import write_record

from bnn_align.sweep import Cache, load_study, run
from bnn_align.sweep.runner import RunSummary, _Ray, _schedule, _Serial
from bnn_align.sweep.steps import Step

RESULTS = Path(__file__).parent / "results"


def study_file(folder: Path, epochs: int) -> Path:
    path = folder / "bench.toml"
    path.write_text(f"""
name = "bench"
pairs = 1
methods = ["wasserstein"]
[train]
epochs = {epochs}
[[grid]]
datasets = ["digits"]
archs = ["mlp"]
widths = [64, 128]
guides = ["mean-field"]
""")
    return path


def one_step(executor, epochs: int) -> float:
    """Seconds to run one training step through the runner's scheduler."""
    step = Step("train", {"dataset": "digits", "arch": "mlp", "width": 128,
                          "guide": "mean-field", "seed": 100, "epochs": epochs,
                          "batch_size": 128, "lr": 1e-2, "lr_end": 1e-3, "init_scale": 1e-3},
                (), "train bench")
    started = time.perf_counter()
    _schedule([step], 0, executor, lambda step, result: None, RunSummary(), False)
    return time.perf_counter() - started


def _warm_up() -> None:
    from bnn_align.sweep.execute import _data

    _data("digits", "mlp")
    time.sleep(0.5)  # keeps this worker busy so the other warm-up task gets the other one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    import ray

    load_before = os.getloadavg()  # other users of the machine show here
    folder = Path(tempfile.mkdtemp(prefix="bench_sweep-"))
    study = load_study(study_file(folder, args.epochs))
    from bnn_align.sweep.execute import _data

    _data("digits", "mlp")  # the serial run starts with its data in memory, as a worker would

    rows, startup, init = [], 0.0, 0.0
    for label in ("first run", "second run"):
        started = time.perf_counter()
        serial = run(study, folder / f"serial-{label}", serial=True, progress=False)
        serial_seconds = time.perf_counter() - started
        if not ray.is_initialized():
            started = time.perf_counter()
            ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
            init = time.perf_counter() - started
            warm_up = ray.remote(num_cpus=1)(_warm_up)
            ray.get([warm_up.remote() for _ in range(args.cpus)])
            startup = time.perf_counter() - started
        started = time.perf_counter()
        on_ray = run(study, folder / f"ray-{label}", progress=False)
        ray_seconds = time.perf_counter() - started
        assert serial.ran == on_ray.ran and not serial.failed and not on_ray.failed
        rows.append({"case": f"{sum(serial.ran.values())}-step study, {label}",
                     "serial_s": serial_seconds, "ray_s": ray_seconds,
                     "speed_up": serial_seconds / ray_seconds,
                     "speed_up_with_startup": serial_seconds / (ray_seconds + startup)})

    one_serial = one_step(_Serial(Cache(folder / "one-serial")), args.epochs)
    one_ray = one_step(_Ray(Cache(folder / "one-ray"), None, 0.0, False), args.epochs)
    ray.shutdown()

    rows.append({"case": "one training step", "serial_s": one_serial, "ray_s": one_ray,
                 "overhead": one_ray / one_serial - 1})
    print(f"{'case':<30}{'serial s':>10}{'Ray s':>10}{'ratio':>10}")
    for r in rows:
        print(f"{r['case']:<30}{r['serial_s']:>10.2f}{r['ray_s']:>10.2f}"
              f"{r['serial_s'] / r['ray_s']:>10.2f}")
    print(f"Ray start-up: {startup:.2f} s (ray.init on {args.cpus} CPUs {init:.2f} s, then the "
          f"workers' imports and data); first run's speed-up with it: "
          f"{rows[0]['speed_up_with_startup']:.2f}; one-step overhead "
          f"{100 * rows[-1]['overhead']:.1f} %")
    write_record(RESULTS / "sweep.json", __doc__.split("\n")[0], rows,
                 ray_startup_seconds=startup, ray_init_seconds=init, cpus=args.cpus, epochs=args.epochs,
                 load_average_before=load_before, load_average_after=os.getloadavg())


if __name__ == "__main__":
    main()
