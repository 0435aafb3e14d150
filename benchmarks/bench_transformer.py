"""Speed and memory of ``bnn_align.match`` on a transformer with head sets, against weight
matching with a head-agnostic spec.

The network (``--size gpt2``) has GPT-2 small's body: 12 pre-norm ``nn.TransformerEncoderLayer``
blocks of model dimension 768, 12 heads and MLP width 3072, a linear token embedding from 64
input features, learned positions for 16 tokens and an untied 768 -> 50257 output layer: about
124 M parameters, as many as GPT-2 small (whose output layer is tied to its embedding).
``--size small`` is 4 blocks of 256 with 8 heads and 1000 outputs (about 4 M). Two mean-field
posteriors (``AutoNormal``) are built from networks initialised with different seeds, with
random standard deviations (``exp(N(-3, 1))``), and three matchings are run, each in a fresh
subprocess (so one's memory does not flatter the next):

* ``heads_w2``: ``match(a, b)``, the derived spec with its head sets, method "wasserstein"
  (means and standard deviations, hierarchical head steps);
* ``heads_mean``: the same on the means alone (``method="mean"``);
* ``agnostic_mean``: ``match(a, b, method="mean", spec=...)`` with a hand-written head-agnostic
  spec (the same axes, query/key and value dimensions as plain full-width groups, no head
  sets): Git Re-Basin's weight matching as written for transformers by tools that ignore heads
  (its result may split heads, i.e. change the function).

Each reports the seconds of ``match`` (at most ``--max-iter`` sweeps), its sweeps, whether it
converged, and the peak extra resident memory while it ran (sampled every 2 ms, with
``MALLOC_MMAP_THRESHOLD_`` fixed so freed arrays leave the resident set) relative to the bytes
of both guides' parameters (the goal is below 3). Results go to
``benchmarks/results/transformer_<size>.json``. Run ``python benchmarks/bench_transformer.py
--size small`` (a minute) or ``--size gpt2`` (about 10 GB of memory; tens of minutes on 2
cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyro
import torch

from _record import write_record
from bench_match import PeakRSS
from bnn_align import BayesianNetwork, PermutationSpec, guides, match
from bnn_align.posterior import model_of
from torch import nn

SIZES = {  # layers, dim, heads, mlp width, outputs
    "gpt2": (12, 768, 12, 3072, 50257),
    "small": (4, 256, 8, 1024, 1000),
}
TOKENS, FEATURES = 16, 64
CASES = ("heads_w2", "heads_mean", "agnostic_mean")


class Body(nn.Module):
    def __init__(self, layers, dim, heads, width, outputs):
        super().__init__()
        self.embed = nn.Linear(FEATURES, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(1, TOKENS, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, outputs)

    def forward(self, x):
        return self.head(self.norm(self.encoder(self.embed(x) + self.pos)))


def make_guide(size: str, seed: int):
    torch.manual_seed(seed)
    net = Body(*SIZES[size])
    for layer in net.encoder.layers:  # TransformerEncoder deep-copies one initialisation
        layer.self_attn._reset_parameters()
        for lin in (layer.linear1, layer.linear2):
            lin.reset_parameters()
    model = BayesianNetwork(net, input_shape=(TOKENS, FEATURES))
    guide = guides.mean_field(model)
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for p in guide.scales.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) - 3)
    return guide


def agnostic(spec: PermutationSpec) -> PermutationSpec:
    return PermutationSpec(spec.axes_to_perm, blocks=spec.blocks)


def one(size: str, case: str, max_iter: int) -> dict:
    built = time.perf_counter()
    with pyro.get_param_store().scope():
        a = make_guide(size, 0)
    with pyro.get_param_store().scope():
        b = make_guide(size, 1)
    built = time.perf_counter() - built
    spec = model_of(a).spec
    kwargs = {"max_iter": max_iter, "num_threads": 2}
    if case == "heads_mean":
        kwargs["method"] = "mean"
    elif case == "agnostic_mean":
        kwargs.update(method="mean", spec=agnostic(spec))
    params = sum(p.numel() for p in model_of(a).net.parameters())
    guide_bytes = sum(p.numel() * p.element_size() for g in (a, b) for p in g.parameters())
    with PeakRSS() as mem:
        started = time.perf_counter()
        result = match(a, b, **kwargs)
        seconds = time.perf_counter() - started
    splits = 0
    for members in spec.heads.values():
        for g, d in members.items():
            blocks = result.perms[g].reshape(-1, d) // d
            splits += int((blocks != blocks[:, :1]).any(1).sum())
    return {"size": size, "case": case, "parameters": params, "seconds": seconds,
            "sweeps": result.iterations, "converged": result.converged,
            "cost_before": result.cost_before, "cost_after": result.cost_after,
            "heads_split": splits, "guide_bytes": guide_bytes,
            "peak_extra_bytes": mem.extra, "memory_ratio": mem.extra / guide_bytes,
            "build_seconds": built}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--max-iter", type=int, default=20)
    parser.add_argument("--one", nargs=2, metavar=("CASE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        case, out = args.one
        Path(out).write_text(json.dumps(one(args.size, case, args.max_iter)))
        return
    rows = []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    for case in args.cases:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            subprocess.run([sys.executable, __file__, "--size", args.size, "--max-iter",
                            str(args.max_iter), "--one", case, out.name], check=True, env=env)
            rows.append(json.loads(Path(out.name).read_text()))
        row = rows[-1]
        print(f"{row['case']:>14} {row['parameters'] / 1e6:7.1f}M params "
              f"{row['seconds']:8.2f} s {row['sweeps']:>3} sweeps "
              f"conv={row['converged']!s:5} cost {row['cost_before']:.4g} -> "
              f"{row['cost_after']:.4g} split heads {row['heads_split']:>3} "
              f"memory {row['memory_ratio']:.2f}x guides", flush=True)
    base = next((r for r in rows if r["case"] == "agnostic_mean"), None)
    if base is not None:
        for row in rows:
            row["seconds_vs_agnostic_mean"] = row["seconds"] / base["seconds"]
            print(f"{row['case']:>14}: {row['seconds_vs_agnostic_mean']:.2f}x the time of the "
                  f"head-agnostic weight matching")
    write_record(Path(__file__).parent / "results" / f"transformer_{args.size}.json",
                 __doc__.split("\n")[0], rows, max_iter=args.max_iter)


if __name__ == "__main__":
    main()
