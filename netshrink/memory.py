"""Peak resident memory of a piece of work (a trial), measured by the kernel.

On Linux the process's high-water mark (``VmHWM`` in ``/proc/self/status``) is reset at the start
(writing ``5`` to ``/proc/self/clear_refs``, Linux 4.0 and later) and read at the end, so a Ray worker
that runs several trials reports each trial's own peak. Where the reset is refused, the figure is the
process's peak since it started (``resource.getrusage``), which is an upper bound for the work:
``PeakMemory.since_start`` says which one was measured.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


class PeakMemory:
    """``with PeakMemory() as peak: ...`` then ``peak.bytes``: the peak resident set of this process during the block."""

    def __init__(self) -> None:
        self.bytes = 0
        self.since_start = False

    def __enter__(self) -> "PeakMemory":
        try:
            CLEAR_REFS.write_text("5")
        except OSError:
            self.since_start = True
        return self

    def __exit__(self, *_exc) -> None:
        self.bytes = _high_water_mark() if not self.since_start else 0
        if not self.bytes:
            self.since_start = True
            self.bytes = _lifetime_peak()


def _high_water_mark() -> int:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _lifetime_peak() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kilobytes elsewhere
