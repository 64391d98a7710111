"""Run a Python program with its wall clock shifted: ``python skewed.py OFFSET_S PYTHON SCRIPT
ARGS...`` (PYTHON is ignored: it lets this wrap a command line that names its interpreter).

``time.time`` and ``time.time_ns`` (which syncengine's clocks read) are shifted by OFFSET_S
seconds; the monotonic clock, and so every timeout and sleep, is left alone. This replaces
``faketime --exclude-monotonic`` of the plan: libfaketime 0.9.10 (Debian 12) breaks CPython
3.11's ``time.sleep`` and lock timeouts (``clock_nanosleep`` with ``TIMER_ABSTIME`` fails with
EINVAL when the monotonic clock is excluded, and hangs when it is not).
"""

from __future__ import annotations

import runpy
import sys
import time


def main() -> None:
    offset_s = float(sys.argv[1])
    offset_ns = int(offset_s * 1e9)
    real_time, real_time_ns = time.time, time.time_ns
    time.time = lambda: real_time() + offset_s
    time.time_ns = lambda: real_time_ns() + offset_ns
    script = sys.argv[3]
    sys.argv = [script, *sys.argv[4:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
