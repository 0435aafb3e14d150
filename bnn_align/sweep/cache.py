"""On-disk results of steps, each file checked by a checksum before it is used.

An entry is one file, ``<label>-<key>.pt`` (the label starts with the step's kind): a header line, the SHA-256 of the payload and
the payload (``torch.save`` of plain data: tensors, numbers, strings, lists, dicts). It is
written to a temporary file in the same folder and renamed into place, so a reader never sees a
half-written entry; an entry that is truncated or altered anyway fails its checksum and counts
as missing, so its step runs again.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["Cache", "CorruptEntry"]

_MAGIC = b"bnn_align.sweep/1\n"
_DIGEST_BYTES = 64  # hex SHA-256


class CorruptEntry(ValueError):
    """A cache entry whose checksum does not match its contents (or that is cut short).

    A ``ValueError``: :meth:`Cache.load` raises it, :meth:`Cache.valid` says False instead
    (see the example of :class:`Cache`).

    Examples
    --------
    >>> from bnn_align import sweep
    >>> issubclass(sweep.CorruptEntry, ValueError)
    True
    """


class Cache:
    """A folder of step results keyed by :attr:`Step.key`; safe for concurrent writers of
    different keys, and of the same key (the last rename wins with identical contents).

    Parameters
    ----------
    root : str or os.PathLike
        The folder (created on the first :meth:`store`).

    Examples
    --------
    >>> import tempfile
    >>> import torch
    >>> from bnn_align import sweep
    >>> folder = tempfile.TemporaryDirectory()
    >>> cache = sweep.Cache(folder.name)
    >>> step = sweep.Step("train", {"seed": 0}, label="train seed 0")
    >>> cache.valid(step)
    False
    >>> path = cache.store(step, {"losses": torch.tensor([3.0, 2.0])})
    >>> path.name == f"train-seed-0-{step.key}.pt"
    True
    >>> cache.valid(step), cache.load(step)["losses"]
    (True, tensor([3., 2.]))

    An entry cut short fails its checksum: the step counts as not done.

    >>> _ = path.write_bytes(path.read_bytes()[:-3])
    >>> cache.valid(step)
    False
    >>> cache.load(step)
    Traceback (most recent call last):
        ...
    bnn_align.sweep.cache.CorruptEntry: ...: checksum mismatch (truncated or altered)
    >>> folder.cleanup()
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._checked: dict[Path, tuple[int, int]] = {}  # path -> (size, mtime) found valid

    def path(self, step) -> Path:
        """Where the step's entry is: ``<root>/<label>-<key>.pt``, the label made a file name."""
        label = re.sub(r"[^\w.-]+", "-", step.label).strip("-")
        return self.root / f"{label}-{step.key}.pt"

    def valid(self, step) -> bool:
        """Whether the step's entry exists and passes its checksum (checked once per run of
        the file's size and modification time)."""
        path = self.path(step)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return False
        if self._checked.get(path) == (stat.st_size, stat.st_mtime_ns):
            return True
        try:
            _verified(path.read_bytes(), path)
        except CorruptEntry:
            return False
        self._checked[path] = (stat.st_size, stat.st_mtime_ns)
        return True

    def load(self, step) -> dict[str, Any]:
        """The step's payload. Raises ``FileNotFoundError`` or :class:`CorruptEntry`."""
        path = self.path(step)
        payload = _verified(path.read_bytes(), path)
        # plain data only: loading runs no code from the file
        return torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")

    def store(self, step, payload: dict[str, Any]) -> Path:
        """Write the step's entry atomically (temporary file, then rename)."""
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        data = buffer.getvalue()
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(step)
        handle, temporary = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".pt")
        try:
            with os.fdopen(handle, "wb") as f:
                f.write(_MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n" + data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return path


def _verified(blob: bytes, path: Path) -> bytes:
    start = len(_MAGIC) + _DIGEST_BYTES + 1
    if not blob.startswith(_MAGIC) or len(blob) < start:
        raise CorruptEntry(f"{path}: not a complete bnn_align.sweep cache entry")
    digest, payload = blob[len(_MAGIC):start - 1], blob[start:]
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CorruptEntry(f"{path}: checksum mismatch (truncated or altered)")
    return payload
