"""How many threads torch runs the library's compute loops on (``match``'s solver, ``fit``'s
steps), and a guard that sets the count and gives the process-wide setting back.

Small problems run on one thread: there every step is many short operations, each split between
threads that must meet at its end, so threads save little on an idle machine and cost several
times over when another process holds a core (a thread descheduled at a barrier stalls the
step). Work above ``THREADED_WORK`` multiply-adds per operation amortises the meeting.
Measurements: ``benchmarks/NOTES.md``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ._checks import check_int

THREADED_WORK = 2 ** 30


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run torch's operations (and the solver's thread pool, which follows torch's count) on
    ``count`` threads; the setting is process-wide, so it is restored at once."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def thread_count(num_threads: int | None, work: float) -> int:
    """``num_threads`` if given (checked), else one thread below ``THREADED_WORK`` multiply-adds
    of ``work`` (the largest single operation) and torch's own count above."""
    if num_threads is not None:
        return check_int("num_threads", num_threads)
    return 1 if work < THREADED_WORK else torch.get_num_threads()
