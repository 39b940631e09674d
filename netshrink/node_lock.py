"""A machine-wide reader/writer lock that keeps latency measurements quiet.

Concurrent trials share a machine. If one trial trains while another measures
latency, the measured figure depends on what the neighbour happens to do (on a
2-vCPU machine, up to 37% slower was seen). So every compute step (a training
step, an evaluation batch) holds a *shared* slot, and a latency measurement
holds the slot *exclusively*: while it runs, other trials on the node wait
between two steps, for the fraction of a second a measurement takes.

Implemented with ``flock`` on two files, the *gate* and the *work* file. The
gate is a turnstile: a pending measurement closes it, so a stream of training
steps cannot starve the measurement.

The files live in a folder only their user can enter (see ``lock_folder``), not
at fixed names in the shared temp folder: there another user could create them
first and hold the lock for ever, or leave a symlink for the next open to
follow. So the lock spans the processes of one user on one machine, which is
what a search is (Ray runs all of a node's workers as the user who started it).
"""

from __future__ import annotations

import fcntl
import functools
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK_DIR_VARIABLE = "NETSHRINK_LOCK_DIR"


def lock_folder() -> Path:
    """``$NETSHRINK_LOCK_DIR``, else ``$XDG_RUNTIME_DIR/netshrink``, else ``<temp folder>/netshrink-<uid>``."""
    explicit = os.environ.get(LOCK_DIR_VARIABLE)
    if explicit:
        return Path(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "netshrink"
    return Path(tempfile.gettempdir()) / f"netshrink-{os.getuid()}"


def _make_private_folder(folder: Path) -> None:
    """Create ``folder`` with mode 0700, or accept it only if it is already a folder of ours that nobody else can enter.

    ``mkdir``'s mode does nothing to a folder that exists, so a pre-existing one is checked, without following a symlink.
    """
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except FileExistsError:  # a file or a dangling symlink: reported below
        pass
    info = os.lstat(folder)
    if stat.S_ISLNK(info.st_mode):
        problem = "is a symlink"
    elif not stat.S_ISDIR(info.st_mode):
        problem = "is not a folder"
    elif info.st_uid != os.getuid():
        problem = f"is owned by uid {info.st_uid}"
    elif info.st_mode & 0o077:
        problem = f"has mode {stat.S_IMODE(info.st_mode):04o}"
    else:
        return
    raise PermissionError(
        f"lock folder {folder} {problem}; it must be a folder of yours with mode 0700 "
        f"(remove it, or set {LOCK_DIR_VARIABLE})"
    )


@functools.cache
def lock_files() -> tuple[Path, Path]:
    """The gate and the work file, in ``lock_folder()``, made private once per process.

    Cached: call ``lock_files.cache_clear()`` after changing ``NETSHRINK_LOCK_DIR`` in a running process.
    """
    folder = lock_folder()
    _make_private_folder(folder)
    return folder / "node.gate", folder / "node.work"


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:  # the folder went away under a long run (a clean-up of the temp folder): make it again
        _make_private_folder(path.parent)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)


@contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    # A new open file description per acquisition: flock locks belong to it, so
    # two acquisitions conflict even inside one process.
    fd = _open(path)
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
    gate, work_file = lock_files()
    with _flock(gate, fcntl.LOCK_EX):
        work = _open(work_file)
        fcntl.flock(work, fcntl.LOCK_SH)
    try:
        yield
    finally:
        os.close(work)


@contextmanager
def quiet_machine() -> Iterator[None]:
    """Hold while measuring latency: no compute slot is in use anywhere on this machine meanwhile."""
    gate, work_file = lock_files()
    with _flock(gate, fcntl.LOCK_EX), _flock(work_file, fcntl.LOCK_EX):
        yield


@contextmanager
def exclusive_file(path: Path, waiting: str, log=print) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if need be) for the block, across processes and machines
    that share the file system's locks. If another process holds it, ``log(waiting)`` once, then wait for it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(waiting)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
