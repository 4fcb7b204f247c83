"""Peak resident-memory probe shared by the benchmark scripts (CPU runs, one process per row).

On Linux the kernel's high-water mark (VmHWM) is reset through /proc/self/clear_refs, so the peak of
one region is measured exactly; elsewhere the process-wide ru_maxrss is the fallback.
"""

from __future__ import annotations

import os
import resource


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes(use_hwm: bool) -> int:
    if use_hwm:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """``with PeakRSS() as m: work()`` → ``m.growth`` (bytes above the start), ``m.peak`` (bytes)."""

    def __enter__(self) -> PeakRSS:
        self._hwm = _reset_hwm()
        self._before = _current_bytes() if self._hwm else _peak_bytes(False)
        return self

    def __exit__(self, *exc) -> None:
        self.peak = _peak_bytes(self._hwm)
        self.growth = self.peak - self._before
