"""Content fingerprints of examples: a resumed pass must see the same data as the interrupted one.

Default example ids are positions, so a resume over changed or reordered data would otherwise be accepted
silently. Each pass chunk records a hash of its examples' collated inputs; resuming recomputes and compares.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .task import Task


def _update(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        digest.update(f"tensor{tuple(value.shape)}{value.dtype}".encode())
        digest.update(value.contiguous().view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    elif isinstance(value, np.ndarray):
        digest.update(f"array{value.shape}{value.dtype}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, Mapping):
        digest.update(b"map")
        for key in sorted(value, key=str):
            digest.update(str(key).encode())
            _update(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"seq{len(value)}".encode())
        for item in value:
            _update(digest, item)
    else:
        digest.update(repr(value).encode())


def examples_fingerprint(task: Task, examples: Sequence) -> int:
    """A nonzero 63-bit hash of the examples' collated inputs, one example at a time (order matters)."""
    digest = hashlib.blake2b(digest_size=8)
    for example in examples:
        _update(digest, task.collate([example]))
    return int.from_bytes(digest.digest(), "little") >> 1 | 1
