"""What each kind of step does: train a posterior, match a pair, evaluate a path.

This is the reproduction study's recipe (the design notes' training recipe; the evaluation of
the marginalized barrier with common random numbers). Every step runs torch on one thread and
numpy's BLAS on one thread, seeds everything it draws, and reads its inputs from the cache, so
its result is the same wherever and whenever it runs.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any, Iterator

import pyro
import torch

from .. import guides
from ..bayesian import BayesianNetwork, fit
from ..paths.curves import Curve, fit_curve
from ..data import DataSplit, digits, mnist1d
from ..marginal import marginal_loss
from .._threads import torch_threads
from ..matching.weights import LEARNED_METHODS, alignment_cost, match
from ..models import mlp, resnet
from ..paths.interpolation import interpolate
from .cache import Cache
from .config import hidden_layers
from .steps import ASYMMETRY, ROW_KEY, Step

__all__ = ["execute", "load_trained", "row_fields", "one_thread"]


def row_fields(metrics: tuple[str, ...] | list[str], asymmetry: bool = False) -> list[str]:
    """The columns of a results row for these metrics (``accuracy`` is shortened to ``acc``);
    the last, ``step``, is the key of the evaluate step that computed the row. With
    ``asymmetry``, an ``asymmetry`` column follows the row's key (studies with asymmetric
    networks)."""
    short = [_short(m) for m in metrics]
    return [*ROW_KEY, *([ASYMMETRY] if asymmetry else []),
            *(f"{s}_{part}" for s in short for part in ("barrier", "se")),
            *(f"{s}_{end}" for s in short for end in ("t0", "t1")),
            "w2_cost", "mean_cost", "match_seconds", "train_seconds", "eval_seconds", "step"]


def _short(metric: str) -> str:
    return "acc" if metric == "accuracy" else metric


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch and numpy's BLAS on one thread (the numbers depend on the thread count); both
    restored afterwards, and torch's global RNG state too."""
    with torch_threads(1), _blas_on_one_thread(), torch.random.fork_rng():
        yield


def _blas_on_one_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # without it numpy's BLAS follows OMP_NUM_THREADS
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def execute(step: Step, cache: Cache, device: str = "cpu") -> dict[str, Any]:
    """Run one step, store its result in ``cache`` and return a small summary (for an evaluate
    step: its results row). ``device`` is where a train step trains."""
    # a scope of its own keeps Pyro's global parameter store as the caller had it
    with one_thread(), pyro.get_param_store().scope():
        if step.kind == "train":
            payload = _train(step, device)
        elif step.kind == "match":
            payload = _match(step, cache)
        elif step.kind == "curve":
            payload = _curve(step, cache)
        elif step.kind == "evaluate":
            payload = _evaluate(step, cache)
        else:
            raise ValueError(f"unknown step kind {step.kind!r}")
    cache.store(step, payload)
    if step.kind == "evaluate":
        return {"row": payload["row"]}
    return {"seconds": payload["seconds"]}


@functools.lru_cache(maxsize=4)
def _data(dataset: str, arch: str) -> DataSplit:
    if dataset == "digits":
        return digits(image=hidden_layers(arch) is None)
    return mnist1d(channel_axis=hidden_layers(arch) is None)


def _untrained(settings, seed: int) -> tuple[BayesianNetwork, Any, DataSplit]:
    """The network and guide of a train step's settings, initialised from ``seed``."""
    split = _data(settings["dataset"], settings["arch"])
    torch.manual_seed(seed)
    layers = hidden_layers(settings["arch"])
    asymmetry = {"asymmetry": settings.get(ASYMMETRY),
                 "asymmetry_seed": settings.get("asymmetry_seed", 0)}
    if layers is not None:
        net = mlp(split.input_shape[0], [settings["width"]] * layers, split.num_classes,
                  **asymmetry)
    else:
        net = resnet(int(settings["arch"][len("resnet"):]), width=settings["width"],
                     dim=len(split.input_shape) - 1, in_channels=split.input_shape[0],
                     num_classes=split.num_classes, **asymmetry)
    model = BayesianNetwork(net, input_shape=split.input_shape)
    if settings["guide"] == "mean-field":
        guide = guides.mean_field(model, settings["init_scale"])
    else:
        guide = guides.low_rank(model, settings["rank"], settings["init_scale"])
    return model, guide, split


def load_trained(step: Step, cache: Cache) -> tuple[BayesianNetwork, Any, DataSplit, float]:
    """(model, guide, data, training seconds) of a finished train step, from the cache
    (raises ``FileNotFoundError`` or ``CorruptEntry`` when it is not there)."""
    model, guide, split = _untrained(step.settings, step.settings["seed"])
    state = cache.load(step)
    guide.load_state_dict(state["guide"])
    return model, guide, split, state["seconds"]


def _train(step: Step, device: str) -> dict[str, Any]:
    s = step.settings
    model, guide, split = _untrained(s, s["seed"])
    x, y = split.train
    recorded: dict[str, list[float]] = {"test_accuracy": [], "test_nll": []}
    recording = [0.0]  # seconds spent recording, which are not training time
    callback = None
    if s.get("history_samples"):
        def callback(epoch: int, trained: Any) -> None:
            began = time.perf_counter()
            curve = marginal_loss(model, trained, split.test, num_samples=s["history_samples"],
                                  seed=s["seed"], metrics=["nll", "accuracy"])
            recorded["test_nll"].append(float(curve.values["nll"][0]))
            recorded["test_accuracy"].append(float(curve.values["accuracy"][0]))
            recording[0] += time.perf_counter() - began
    started = time.perf_counter()
    history = fit(model.to(device), guide.to(device), (x.to(device), y.to(device)),
                  epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"],
                  lr_end=s["lr_end"], seed=s["seed"], progress=False, callback=callback)
    seconds = time.perf_counter() - started - recording[0]
    state = {k: v.detach().cpu() for k, v in guide.state_dict().items()}
    payload = {"guide": state, "seconds": seconds, "elbo": [float(v) for v in history]}
    if callback is not None:
        payload.update(recorded)
    return payload


def _match(step: Step, cache: Cache) -> dict[str, Any]:
    s = step.settings
    _, q0, split, _ = load_trained(step.inputs[0], cache)
    _, q1, _, _ = load_trained(step.inputs[1], cache)
    options: dict[str, Any] = {}
    if s["method"] == "activation":
        options["data"] = split.x_train[:s["activation_points"]]
    if s["method"] in LEARNED_METHODS:  # the validation split comes from the training data
        options.update(data=split.train, epochs=s["epochs"], lr=s["lr"],
                       batch_size=s["batch_size"], num_samples=s["samples"])
    alignment = match(q0, q1, method=s["method"], seed=s["seed"], **options)
    payload = {"perms": alignment.perms, "aligned": alignment.aligned.state_dict(),
               "seconds": alignment.seconds, "cost_before": alignment.cost_before,
               "cost_after": alignment.cost_after, "iterations": alignment.iterations}
    if s["method"] in LEARNED_METHODS:
        payload.update(history=list(alignment.history), kept=alignment.kept,
                       validation_barrier_start=alignment.validation_barrier_start,
                       validation_barrier=alignment.validation_barrier)
    return payload


def _endpoints(step: Step, cache: Cache):
    """(model, q0, the second endpoint as the step uses it, data, training seconds, the
    match's permutations and seconds) of a curve or evaluate step."""
    model, q0, split, seconds0 = load_trained(step.inputs[0], cache)
    _, q1, _, seconds1 = load_trained(step.inputs[1], cache)
    other, perms, match_seconds = q1, None, 0.0
    found = next((cache.load(s) for s in step.inputs if s.kind == "match"), None)
    if found is not None:
        # the aligned guide exactly as match built it (a low-rank factor is also rotated)
        _, other, _ = _untrained(step.inputs[1].settings, step.inputs[1].settings["seed"])
        other.load_state_dict(found["aligned"])
        perms, match_seconds = found["perms"], found["seconds"]
    return model, q0, q1, other, split, seconds0 + seconds1, perms, match_seconds


def _curve(step: Step, cache: Cache) -> dict[str, Any]:
    s = step.settings
    model, q0, _, other, split, _, _, _ = _endpoints(step, cache)
    snapshots: dict[int, dict] = {}
    keep = set(s["checkpoints"]) | {s["epochs"]}

    def snapshot(epoch: int, curve: Curve) -> None:
        if epoch in keep:
            snapshots[epoch] = curve.state_dict()

    started = time.perf_counter()
    fit_curve(model, q0, other, split.train, kind=s["kind"], bends=s["bends"],
              epochs=s["epochs"], lr=s["lr"], lr_end=s["lr_end"], num_samples=s["samples"],
              seed=s["seed"], progress=False, callback=snapshot)
    return {"curves": snapshots, "seconds": time.perf_counter() - started}


def _evaluate(step: Step, cache: Cache) -> dict[str, Any]:
    s = step.settings
    model, q0, q1, other, split, train_seconds, perms, match_seconds = _endpoints(step, cache)
    if "curve_epochs" in s:
        curve_step = next(i for i in step.inputs if i.kind == "curve")
        state = cache.load(curve_step)["curves"][s["curve_epochs"]]
        path = Curve.from_state_dict(state, model=model)
    else:
        path = interpolate(q0, other, s["path"])
    started = time.perf_counter()
    curve = marginal_loss(model, path, split.test,
                          ts=s["points"], num_samples=s["samples"], seed=s["pair"],
                          metrics=s["metrics"])
    row: dict[str, Any] = {k: s[k] for k in ROW_KEY}
    row[ASYMMETRY] = s.get(ASYMMETRY, "none")
    for metric in s["metrics"]:
        barrier = curve.barrier(metric)
        row[f"{_short(metric)}_barrier"], row[f"{_short(metric)}_se"] = barrier.value, barrier.se
    for metric in s["metrics"]:
        row[f"{_short(metric)}_t0"] = float(curve.values[metric][0])
        row[f"{_short(metric)}_t1"] = float(curve.values[metric][-1])
    # every method's permutations on both objectives: tells a poor optimum of the W2 objective
    # from an objective that prefers a worse alignment
    row["w2_cost"] = alignment_cost(q0, q1, perms)
    row["mean_cost"] = alignment_cost(q0, q1, perms, method="mean")
    row["match_seconds"] = match_seconds
    row["train_seconds"] = train_seconds
    row["eval_seconds"] = time.perf_counter() - started
    row["step"] = step.key
    return {"row": {k: row[k] for k in row_fields(s["metrics"], ASYMMETRY in s)}}
