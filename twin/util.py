"""Small helpers every package shares, each written once: the percentile definition, atomic file writes,
a free local port, the dtype names and the process/machine memory readings."""
from __future__ import annotations

import math
import os
import socket
import tempfile
from pathlib import Path

import torch

# dtype names the recipe, the artifact and the server settings accept
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB', 3.2e9 -> '2.98 GiB': three significant digits in the largest unit below n."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def human_count(n: float) -> str:
    """Parameters: 0.9e6 -> '900K', 1.54e9 -> '1.54B'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def percentile(values: list[float], p: float) -> float | None:
    """The ``p``-th percentile (0..100) with linear interpolation between the closest ranks — numpy's default
    (``numpy.percentile(values, p)``); None for no values. Every p50/p99 twinserve reports (``/v1/stats``,
    the load tester, the bench) uses this definition."""
    if not values:
        return None
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename: a reader sees the old
    file or the whole new one, and an interrupted write leaves no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` with nothing listening at the time of the call."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def available_memory() -> int:
    """Bytes the machine can give a new allocation now (psutil's ``available``)."""
    import psutil
    return int(psutil.virtual_memory().available)


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of process ``pid`` (this one by default); 0 where it cannot be read."""
    import psutil
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


def peak_rss_bytes() -> int:
    """This process's resident high-water mark (VmHWM; it cannot be reset, so it covers the whole run)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
