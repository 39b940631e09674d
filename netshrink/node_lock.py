"""A machine-wide reader/writer lock that keeps latency measurements quiet.

Concurrent trials share a machine. If one trial trains while another measures
latency, the measured figure depends on what the neighbour happens to do (on a
2-vCPU machine, up to 37% slower was seen). So every compute step (a training
step, an evaluation batch) holds a *shared* slot, and a latency measurement
holds the slot *exclusively*: while it runs, other trials on the node wait
between two steps, for the fraction of a second a measurement takes.

Implemented with ``flock`` on two files in the temp folder, one pair per
machine. The *gate* is a turnstile: a pending measurement closes it, so a
stream of training steps cannot starve the measurement.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK_DIR = Path(os.environ.get("NETSHRINK_LOCK_DIR", tempfile.gettempdir()))
GATE = LOCK_DIR / "netshrink-node.gate"
WORK = LOCK_DIR / "netshrink-node.work"


@contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    # A new open file description per acquisition: flock locks belong to it, so
    # two acquisitions conflict even inside one process.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextmanager
def compute_slot() -> Iterator[None]:
    """Hold around one unit of heavy compute (a training step, an evaluation batch).

    Never nest two slots: a measurement waiting at the gate would deadlock
    against the outer one.
    """
    with _flock(GATE, fcntl.LOCK_EX):
        work = os.open(WORK, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(work, fcntl.LOCK_SH)
    try:
        yield
    finally:
        os.close(work)


@contextmanager
def quiet_machine() -> Iterator[None]:
    """Hold while measuring latency: no compute slot is in use anywhere on this machine meanwhile."""
    with _flock(GATE, fcntl.LOCK_EX), _flock(WORK, fcntl.LOCK_EX):
        yield
