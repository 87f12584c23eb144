"""The machine a benchmark ran on, for the first line of its table."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor())


def machine() -> str:
    return f"{cpu_name()}, {len(os.sched_getaffinity(0))} cores available, Python {platform.python_version()}"
