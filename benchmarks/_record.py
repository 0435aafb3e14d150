"""What every benchmark writes next to its rows: the machine and the library versions."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np
import pyro
import scipy
import torch

import bnn_align


def _kernels() -> dict:
    """Which matrix-product kernels the numbers came from: numpy's BLAS and the core type it
    runs (``OPENBLAS_CORETYPE`` can pin it), and whether the solver's large products go to
    oneDNN (see ``bnn_align.matching._gemm``)."""
    from bnn_align.matching import _gemm

    blas = "unknown"
    try:
        import threadpoolctl

        blas = ", ".join(f"{lib['internal_api']} {lib.get('architecture', '')}".strip()
                         for lib in threadpoolctl.threadpool_info()
                         if lib["user_api"] == "blas")
    except ImportError:
        pass
    return {"numpy_blas": blas, "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
            "onednn_products": _gemm._onednn()}


def write_record(path: Path, description: str, rows: list[dict], **extra) -> None:
    """Write ``{"benchmark", "machine", **extra, "rows"}`` as JSON and say where."""
    record = {
        "benchmark": description,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "pyro": pyro.__version__, "numpy": np.__version__,
                    "scipy": scipy.__version__, "bnn_align": bnn_align.__version__,
                    **_kernels()},
        **extra,
        "rows": rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {path}")
