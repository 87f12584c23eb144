"""The machine a benchmark ran on, for the first line of its table; and a child process measured as it runs."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor())


def machine() -> str:
    return f"{cpu_name()}, {len(os.sched_getaffinity(0))} cores available, Python {platform.python_version()}"


def run_child(cmd: list[str], what: str) -> tuple[str, float]:
    """(the last line ``cmd`` printed, the peak RSS in MiB of it and all its workers, sampled every 10 ms)."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.01)
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{what} failed with exit code {proc.returncode}")
    return out.strip().splitlines()[-1], peak / 2**20
