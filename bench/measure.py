"""Measuring tools shared by the benchmark sections: wall-clock timing, percentiles, peak RSS, thread settings.

Every section runs in a fresh process (``isolated``), so its peak resident memory is its own and one section's
loaded models or thread settings cannot leak into the next. Left out on purpose: CPU pinning and turbo/frequency
control (not portable); the host, CPU count and load average are recorded instead so a reader can judge noise.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np

# Threads chosen deliberately (MODELS.md): one FAISS query on 2 OpenMP threads was ~20x slower than on 1, and
# single-query latency work never gains from a second thread; batch work (embedding, generation, training) uses
# every core. Sections set these themselves and record what they used.
QUERY_THREADS = 1


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_threads(n: int) -> int:
    """torch intra-op and FAISS OpenMP threads (whichever is importable) to ``n``; returns ``n``."""
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        pass
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:
        pass
    return n


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)


def rss_mb() -> float:
    """Current resident set size in MiB (from /proc; falls back to the peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20), 1)
    except OSError:
        return peak_rss_mb()


def timed(fn: Callable, *args, **kwargs) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def latencies(fn: Callable, inputs: list, warmup: int = 2) -> dict:
    """Call ``fn(x)`` once per input, one at a time, after ``warmup`` untimed calls; p50/p95/mean in ms."""
    for x in inputs[:warmup]:
        fn(x)
    secs = []
    for x in inputs:
        t0 = time.perf_counter()
        fn(x)
        secs.append(time.perf_counter() - t0)
    return summary_ms(secs)


def summary_ms(seconds: list[float]) -> dict:
    a = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p95_ms": round(float(np.percentile(a, 95)), 3),
            "mean_ms": round(float(a.mean()), 3), "n": len(a)}


def median_of(fn: Callable, repeats: int = 3) -> float:
    """Median wall-clock seconds of ``repeats`` calls of ``fn()``."""
    return statistics.median(timed(fn)[1] for _ in range(repeats))


def du_mb(path) -> float:
    """Size on disk of a file or folder tree, in MiB."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return round(os.path.getsize(path) / (1 << 20), 2)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return round(total / (1 << 20), 2)


def memory_bandwidth_gbs(mb: int = 256, repeats: int = 5) -> float:
    """Copy bandwidth in GB/s (bytes read + bytes written) of a large numpy copy: the bound decoding hits."""
    src = np.ones(mb * (1 << 20) // 8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch every page first
    best = min(timed(np.copyto, dst, src)[1] for _ in range(repeats))
    return round(2 * src.nbytes / best / 1e9, 2)


def matmul_gflops(n: int = 1024, repeats: int = 5, threads: int | None = None) -> float:
    """fp32 GFLOP/s of a square torch matmul (2n³ FLOPs): the practical compute ceiling of this CPU."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(timed(torch.mm, a, b)[1] for _ in range(repeats))
    return round(2 * n**3 / best / 1e9, 1)


def host() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (None,) * 3
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"host": platform.node(), "cpu": cpu, "cores": cores(), "python": platform.python_version(),
            "platform": platform.platform(), "load_avg_1_5_15": [round(x, 2) for x in load if x is not None]}


def run_section(module: str, **kwargs) -> dict:
    """Import a section module and call its ``run(**kwargs)`` (what ``isolated`` runs for ``python -m bench``)."""
    import importlib
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs each CPU-feature probe
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", os.environ["HF_HUB_OFFLINE"])
    return importlib.import_module(module).run(**kwargs)


def _child(fn: Callable, args: tuple, kwargs: dict) -> tuple[object, float]:
    out = fn(*args, **kwargs)
    return out, peak_rss_mb()


def isolated(fn: Callable, *args, **kwargs) -> tuple[object, float]:
    """Run ``fn(*args, **kwargs)`` in a fresh (spawned) Python process; returns (result, its peak RSS in MiB).

    ``fn`` must be a module-level function and its result picklable.
    """
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_child, fn, args, kwargs).result()
