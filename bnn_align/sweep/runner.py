"""Run a study's steps: as Ray tasks (one core each) or serially in this process.

The driver (this process) schedules: a step is submitted once its inputs are done, at most as
many at a time as the cluster has CPUs, evaluations and matches before trainings so rows arrive
early. Each task reads its inputs from the cache folder and writes its own entry there, and
returns only a small summary (a results row, or its run time), so posteriors never travel
through Ray's object store; on a cluster the output folder must therefore be on a file system
every node sees, and bnn_align must be installed on every node. A task whose worker dies is
retried by Ray; since entries are written atomically, a retried step starts from scratch.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .cache import Cache, CorruptEntry
from .config import Study
from .execute import execute, row_fields
from .results import ResultsTable
from .select import RowFilter
from .steps import KINDS, Step, expand

__all__ = ["run", "RunSummary", "GPU_SHARE"]

# the share of a GPU a training task asks for where the cluster has GPUs
GPU_SHARE = 0.25
_PRIORITY = {"evaluate": 0, "curve": 1, "match": 2, "train": 3}


@dataclass
class RunSummary:
    """What a call of :func:`run` did.

    Attributes
    ----------
    total : int
        Steps of the (filtered) study.
    cached : int
        Steps found done in the cache (valid checksum).
    ran : dict of str to int
        Steps run, by kind (in a dry run: the steps that would run).
    failed : list of (str, str)
        Label and error of every step that failed; the steps depending on them did not run.
    rows_added, rows : int
        Rows written by this call, and rows in the table.
    results : Path
        The results CSV (the Parquet copy is beside it).
    seconds : float

    Examples
    --------
    What a dry run would do:

    >>> from bnn_align import sweep
    >>> study = sweep.parse_study({"pairs": 2, "train": {"epochs": 1},
    ...                            "grid": [{"datasets": ["digits"], "archs": ["mlp"],
    ...                                      "widths": [8], "guides": ["mean-field"]}]})
    >>> summary = sweep.run(study, "unused-folder", dry_run=True, echo=lambda line: None)
    >>> summary.total, summary.cached, summary.ran
    (14, 0, {'train': 4, 'match': 4, 'curve': 0, 'evaluate': 6})
    >>> summary.results.name
    'study.csv'
    """

    total: int = 0
    cached: int = 0
    ran: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    failed: list[tuple[str, str]] = field(default_factory=list)
    rows_added: int = 0
    rows: int = 0
    results: Path = Path()
    seconds: float = 0.0

    def __str__(self) -> str:
        ran = ", ".join(f"{kind} {n}" for kind, n in self.ran.items())
        text = (f"{sum(self.ran.values())} of {self.total} steps run ({ran}), {self.cached} "
                f"cached; {self.rows_added} rows added, {self.rows} in {self.results}")
        if self.failed:
            text += f"; {len(self.failed)} failed:\n" + "\n".join(
                f"  {label}: {error}" for label, error in self.failed)
        return text


def run(study: Study, out: str | Path, *, only: Iterable[RowFilter] = (),
        address: str | None = None, serial: bool = False, dry_run: bool = False,
        progress: bool = True, echo: Callable[[str], Any] = print,
        gpu_share: float = GPU_SHARE) -> RunSummary:
    """Run every step of ``study`` that is not in the cache of ``out``; rows go to
    ``out/<study.name>.csv`` (and ``.parquet``) as they finish.

    Parameters
    ----------
    study : Study
        From :func:`load_study`.
    out : path
        Output folder: the results table and the step cache (``out/cache``); with
        ``train.history_samples``, also ``<name>_history.csv`` (negative ELBO, test accuracy
        and NLL after every training epoch of every finished train step).
    only : iterable of RowFilter
        Run only the rows passing one of these filters (and the steps they need).
    address : str, optional
        Ray cluster to connect to (``"auto"``, ``"ray://host:10001"``). By default a Ray
        already initialised in this process is used, or a local one started on all cores
        (and stopped at the end).
    serial : bool
        Run every step in this process, one after another, without Ray.
    dry_run : bool
        Only report (through ``echo``) every step, whether it is cached, and the totals.
    progress : bool
        Show a progress bar: steps done / to do and the kinds of the running steps.
    echo : callable
        Where the dry run's lines go.
    gpu_share : float
        Share of a GPU a training task asks Ray for, where the cluster has GPUs.

    Returns
    -------
    RunSummary
        ``print(summary)`` tells what ran, what was cached and what failed; a failed step
        does not stop the others (only the steps that need it).

    Raises
    ------
    ValueError
        Filters ``only`` that match no row; a results table of ``out`` with other columns.
    ImportError
        Ray is not installed (unless ``serial`` or ``dry_run``).

    Examples
    --------
    A tiny study run serially (no Ray), then again: everything is cached the second time.

    >>> import tempfile
    >>> from bnn_align import sweep
    >>> study = sweep.parse_study({
    ...     "name": "tiny", "pairs": 1, "methods": ["naive", "wasserstein"],
    ...     "train": {"epochs": 1}, "evaluate": {"samples": 4, "points": 3},
    ...     "grid": [{"datasets": ["digits"], "archs": ["mlp"], "widths": [8],
    ...               "guides": ["mean-field"]}]})
    >>> folder = tempfile.TemporaryDirectory()
    >>> sweep.run(study, folder.name, dry_run=True)
    run    train digits-mlp8-mean-field seed 0
    run    train digits-mlp8-mean-field seed 1
    run    match digits-mlp8-mean-field pair 0 wasserstein
    run    evaluate digits-mlp8-mean-field pair 0 naive wasserstein-path
    run    evaluate digits-mlp8-mean-field pair 0 wasserstein wasserstein-path
    5 steps: 0 cached, 5 to run (train 2, match 1, curve 0, evaluate 2)
    RunSummary(total=5, cached=0, ...)
    >>> print(sweep.run(study, folder.name, serial=True, progress=False))
    5 of 5 steps run (train 2, match 1, curve 0, evaluate 2), 0 cached; 2 rows added, 2 in .../tiny.csv
    >>> print(sweep.run(study, folder.name, serial=True, progress=False))
    0 of 5 steps run (train 0, match 0, curve 0, evaluate 0), 5 cached; 0 rows added, 2 in .../tiny.csv
    >>> sweep.read_results(f"{folder.name}/tiny.csv")["method"].tolist()
    ['naive', 'wasserstein']
    >>> folder.cleanup()
    """
    started = time.perf_counter()
    out = Path(out)
    only = list(only)
    steps = expand(study, only)
    if not steps:
        raise ValueError(f"--only {' / '.join(map(str, only))} matches no row of the study")
    cache = Cache(out / "cache")
    table = ResultsTable(out / f"{study.name}.csv", row_fields(
        study.metrics, any(cell.asymmetry != "none" for cell in study.cells)))
    summary = RunSummary(total=len(steps), results=table.csv_path)
    # a row computed by this very step is a finished evaluation even without its cache entry,
    # so a study resumed on another machine from its committed table runs only the missing
    # rows and the steps they need
    recorded = table.step_keys()
    done = {step.key for step in steps if step.key in recorded or cache.valid(step)}
    todo = _needed(steps, done)
    summary.cached = len(done)
    if dry_run:
        running = {step.key for step in todo}
        for step in steps:  # "not needed": every row that uses it is in the table
            state = "cached" if step.key in done else "run" if step.key in running else "unused"
            echo(f"{state:<7}{step.label}")
        counts = collections.Counter(step.kind for step in todo)
        summary.ran = {kind: counts[kind] for kind in KINDS}
        summary.rows = len(table)
        echo(f"{len(steps)} steps: {len(done)} cached, {len(todo)} to run ("
             + ", ".join(f"{k} {summary.ran[k]}" for k in KINDS) + ")")
        return summary
    replaced = table.retain({s.row_key(): s.key for s in steps if s.kind == "evaluate"})
    if replaced:
        echo(f"{replaced} rows of {table.csv_path} were computed with other settings: "
             f"their steps run again")
    for step in steps:
        # a run stopped between a step's cache entry and its row leaves the row to write here
        if step.kind == "evaluate" and step.key in done and step.row_key() not in table:
            try:
                summary.rows_added += table.add(cache.load(step)["row"])
            except CorruptEntry:
                done.discard(step.key)
                todo.append(step)
                summary.cached -= 1

    def finished(step: Step, result: dict[str, Any]) -> None:
        summary.ran[step.kind] += 1
        if step.kind == "evaluate":
            summary.rows_added += table.add(result["row"])

    if todo:
        executor = _Serial(cache) if serial else _Ray(cache, address, gpu_share, progress)
        try:
            _schedule(todo, len(done), executor, finished, summary, progress)
        finally:
            executor.close()
    summary.rows = len(table)
    _write_history(steps, cache, out / f"{study.name}_history.csv")
    summary.seconds = time.perf_counter() - started
    return summary


HISTORY_FIELDS = ("dataset", "arch", "width", "guide", "asymmetry", "seed", "epoch", "neg_elbo",
                  "test_accuracy", "test_nll")


def _write_history(steps: list[Step], cache: Cache, path: Path) -> None:
    """``<name>_history.csv``: the negative ELBO, test accuracy and test NLL after every epoch
    of every finished train step that recorded them (``train.history_samples > 0``); nothing
    is written when none did. Rewritten whole from the cache on every run."""
    import csv

    rows = []
    for step in steps:
        s = step.settings
        if step.kind != "train" or not s.get("history_samples") or not cache.valid(step):
            continue
        try:
            found = cache.load(step)
        except CorruptEntry:
            continue
        for epoch, (elbo, acc, nll) in enumerate(zip(found["elbo"], found["test_accuracy"],
                                                     found["test_nll"]), start=1):
            rows.append({"dataset": s["dataset"], "arch": s["arch"], "width": s["width"],
                         "guide": s["guide"], "asymmetry": s.get("asymmetry", "none"),
                         "seed": s["seed"], "epoch": epoch, "neg_elbo": elbo,
                         "test_accuracy": acc, "test_nll": nll})
    if not rows:
        return
    temporary = path.with_name(f".tmp-{path.name}")
    with temporary.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    temporary.replace(path)


def _needed(steps: list[Step], done: set[str]) -> list[Step]:
    """The steps not ``done`` that an unfinished evaluation needs (itself and its inputs,
    transitively), in the order of ``steps``."""
    needed: set[str] = set()
    stack = [s for s in steps if s.kind == "evaluate" and s.key not in done]
    while stack:
        step = stack.pop()
        if step.key in needed or step.key in done:
            continue
        needed.add(step.key)
        stack.extend(step.inputs)
    return [s for s in steps if s.key in needed]


def _schedule(todo: list[Step], cached: int, executor, finished, summary: RunSummary,
              progress: bool) -> None:
    """Run ``todo`` (inputs before the steps using them; inputs not in it are done)."""
    from tqdm.auto import tqdm

    order = {step.key: i for i, step in enumerate(todo)}
    waiting = {s.key: {i.key for i in s.inputs if i.key in order} for s in todo}
    dependents: dict[str, list[Step]] = collections.defaultdict(list)
    for step in todo:
        for source in step.inputs:
            dependents[source.key].append(step)
    ready = [s for s in todo if not waiting[s.key]]
    running: dict[str, Step] = {}
    bar = tqdm(total=cached + len(todo), initial=cached, desc="study", unit="step",
               disable=not progress)
    try:
        while ready or running:
            ready.sort(key=lambda s: (_PRIORITY[s.kind], order[s.key]), reverse=True)
            while ready and len(running) < executor.capacity():
                step = ready.pop()
                executor.submit(step)
                running[step.key] = step
            kinds = collections.Counter(s.kind for s in running.values())
            bar.set_postfix_str("running " + ", ".join(f"{k} {n}" for k, n in kinds.items()))
            step_key, result, error = executor.wait()
            step = running.pop(step_key)
            bar.update(1)
            if error is not None:
                summary.failed.append((step.label, error))
                bar.total -= _drop(step, dependents, waiting)
                bar.refresh()
                continue
            finished(step, result)
            for dependent in dependents[step.key]:
                waiting[dependent.key].discard(step.key)
                if not waiting[dependent.key]:
                    ready.append(dependent)
    finally:
        bar.close()


def _drop(failed: Step, dependents: dict[str, list[Step]], waiting: dict[str, set]) -> int:
    """Mark the steps depending on a failed step as never ready; returns how many."""
    dropped, stack = set(), [failed]
    while stack:
        for dependent in dependents[stack.pop().key]:
            if dependent.key not in dropped:
                dropped.add(dependent.key)
                waiting[dependent.key].add(failed.key)
                stack.append(dependent)
    return len(dropped)


class _Serial:
    """Steps run in this process when waited for, one at a time."""

    def __init__(self, cache: Cache):
        self.cache, self.queue = cache, collections.deque()
        import torch

        self.device = "cuda" if torch.cuda.is_available() else "cpu"

    def capacity(self) -> int:
        return 1

    def submit(self, step: Step) -> None:
        self.queue.append(step)

    def wait(self) -> tuple[str, Any, str | None]:
        step = self.queue.popleft()
        try:
            return step.key, execute(step, self.cache, self.device), None
        except Exception as error:  # a failed step is reported, the others go on
            return step.key, None, f"{type(error).__name__}: {error}"

    def close(self) -> None:
        pass


class _Ray:
    """Steps run as Ray tasks (one CPU each; training asks for a GPU share where there are
    GPUs); at most as many in flight as the cluster has CPUs."""

    def __init__(self, cache: Cache, address: str | None, gpu_share: float, progress: bool):
        try:
            import ray
        except ImportError:
            raise ImportError("running a study on Ray needs the ray package: pip install "
                              "'bnn_align[sweep]' (or run serially)") from None

        self.ray, self.cache = ray, cache
        self.started_here = not ray.is_initialized()
        if self.started_here:
            options: dict[str, Any] = {"log_to_driver": progress}
            if address is None:
                options["include_dashboard"] = False
            ray.init(address=address, **options)
        self.gpu_share = gpu_share if ray.cluster_resources().get("GPU", 0) > 0 else 0
        self.task = ray.remote(_ray_task)
        self.running: dict[Any, str] = {}

    def capacity(self) -> int:
        return max(1, int(self.ray.cluster_resources().get("CPU", 1)))

    def submit(self, step: Step) -> None:
        gpus = self.gpu_share if step.kind in ("train", "curve") else 0
        ref = self.task.options(num_cpus=1, num_gpus=gpus, max_retries=3,
                                name=step.label).remote(step, str(self.cache.root))
        self.running[ref] = step.key

    def wait(self) -> tuple[str, Any, str | None]:
        [ref], _ = self.ray.wait(list(self.running), num_returns=1)
        key = self.running.pop(ref)
        try:
            return key, self.ray.get(ref), None
        except self.ray.exceptions.RayError as error:
            cause = getattr(error, "cause", None) or error
            return key, None, f"{type(cause).__name__}: {cause}".splitlines()[0]

    def close(self) -> None:
        if self.started_here:
            self.ray.shutdown()
        else:
            for ref in self.running:
                self.ray.cancel(ref)


def _ray_task(step: Step, cache_root: str) -> dict[str, Any]:
    import ray

    device = "cuda" if ray.get_gpu_ids() else "cpu"
    return execute(step, Cache(cache_root), device)
