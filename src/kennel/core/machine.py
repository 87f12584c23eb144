"""What this machine is: the CPU's name and flags, read once from /proc/cpuinfo (empty where there is none)."""

from __future__ import annotations

import functools
import platform


@functools.cache
def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_name() -> str:
    """The CPU model ("Intel(R) Xeon(R) ..."), else what platform knows, else "cpu"."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def cpu_flags() -> set[str]:
    """The first CPU's feature flags (``avx512_bf16``, ``amx_bf16``, ...)."""
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()
