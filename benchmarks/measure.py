"""Timing, peak-memory and environment helpers shared by the CLI and the pytest-benchmark tests.

Timing is round-robin: every implementation of one case runs once per round, in a rotating order, so a
noisy (shared) CPU slows all of them alike and the ratios between them stay meaningful.
"""
from __future__ import annotations

import ctypes
import datetime
import gc
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- OOM
def add_repeat_args(parser, what: str = "timed rounds") -> None:
    """The repeat and disturbance options that every benchmark CLI here shares."""
    parser.add_argument("--min-reps", type=int, default=5, help=f"{what} at least")
    parser.add_argument("--max-reps", type=int, default=50, help=f"{what} at most")
    parser.add_argument("--min-time", type=float, default=1.0, help=f"seconds of {what} at least")
    parser.add_argument("--max-time", type=float, default=15.0, help=f"seconds of {what} at most")
    parser.add_argument("--retries", type=int, default=2,
                        help="CPU: re-time up to this often while other processes disturb the timing")
    parser.add_argument("--max-foreign-load", type=float, default=0.25,
                        help="CPU: cores other processes may keep busy while timing before it is redone")
    parser.add_argument("--retry-wait", type=float, default=3.0, help="seconds to wait before re-timing")


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is an out-of-memory failure (CUDA or host)."""
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    if oom_types and isinstance(err, oom_types):
        return True
    if isinstance(err, MemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "failed to allocate" in text
                                              or "can't allocate memory" in text)


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    else:
        _trim_heap()


# ---------------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once_ms(step: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call of ``step`` in ms, with the device's queue drained on both sides."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def time_round_robin(steps: Dict[str, Callable[[], object]], device: torch.device, min_reps: int = 5,
                     max_reps: int = 50, min_time_s: float = 1.0, max_time_s: float = 20.0,
                     on_error: Optional[Callable[[str, BaseException], None]] = None) -> Dict[str, List[float]]:
    """Time every step once per round until ``min_reps`` rounds and ``min_time_s`` have passed.

    Stops early at ``max_reps`` rounds, or once ``max_time_s`` is spent and 3 rounds are done. A step that
    raises leaves the rotation and is reported through ``on_error`` (which re-raises when it is None).
    Callers warm every step up first: this only measures.
    """
    times: Dict[str, List[float]] = {name: [] for name in steps}
    live = list(steps)
    t_start = time.perf_counter()
    rounds = 0
    while live and rounds < max_reps:
        order = live[rounds % len(live):] + live[:rounds % len(live)]
        for name in order:
            try:
                times[name].append(time_once_ms(steps[name], device))
            except Exception as err:  # noqa: BLE001 - OOM and friends are recorded, never raised
                if on_error is None:
                    raise
                live.remove(name)
                on_error(name, err)
                release_memory(device)
        rounds += 1
        spent = time.perf_counter() - t_start
        if (rounds >= min_reps and spent >= min_time_s) or (rounds >= 3 and spent >= max_time_s):
            break
    return times


class ForeignCpuMeter:
    """Average number of CPU cores that *other* processes (and the hypervisor's steal) kept busy between
    ``start()`` and ``stop()``: how much a shared machine disturbed a CPU timing. None off Linux."""

    def __init__(self):
        self._start = None

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
            with open("/proc/self/stat") as f:
                after_name = f.read().rsplit(")", 1)[1].split()
            own = int(after_name[11]) + int(after_name[12])  # utime + stime of all threads
        except (OSError, ValueError, IndexError):
            return None
        return user + nice + system + irq + softirq + steal, own, time.monotonic()

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> Optional[float]:
        end = self._sample()
        if self._start is None or end is None or end[2] <= self._start[2]:
            return None
        busy, own, wall = (b - a for a, b in zip(self._start, end))
        return max(0.0, (busy - own) / os.sysconf("SC_CLK_TCK") / wall)


def summarize_ms(samples: List[float]) -> Dict[str, float]:
    """Median, quartiles and range of repeated timings."""
    ordered = sorted(samples)
    if len(ordered) >= 2:
        p25, _, p75 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        p25 = p75 = ordered[0]
    return dict(time_ms_median=statistics.median(ordered), time_ms_p25=p25, time_ms_p75=p75,
                time_ms_min=ordered[0], time_ms_max=ordered[-1], reps=len(ordered))


# ---------------------------------------------------------------------------------------------- memory
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def _trim_heap() -> None:
    """Hand free heap pages back to the OS, so that reusing them cannot hide the next call's RSS growth.

    (The allocator itself is left as users get it: fixing glibc's mmap threshold would make every large
    temporary a fresh, page-faulting mapping and slow the timings down.)
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _proc_status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; Linux >= 4.0 only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_mb(step: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak memory growth of one call of ``step`` in MiB, above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU: the growth of the process's peak RSS
    (VmHWM, reset through /proc/self/clear_refs), or None where the OS cannot reset it.
    """
    release_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    if not _reset_rss_peak():
        return None
    base = _proc_status_kib("VmRSS")
    step()
    peak = _proc_status_kib("VmHWM")
    if base is None or peak is None:
        return None
    return (peak - base) / 1024


def total_ram_gib() -> Optional[float]:
    kib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    kib = int(line.split()[1])
    except OSError:
        return None
    return kib / 2 ** 20 if kib else None


# ---------------------------------------------------------------------------------------------- GEMM probe
def gemm_probe(m: int, k: int, dtype: torch.dtype, device: torch.device):
    """A step running ``torch.mm`` of ``[m, k] @ [k, m]`` and that GEMM's FLOP count."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(k, m, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(m, m, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b, out=out)), 2 * m * m * k


# ---------------------------------------------------------------------------------------------- environment
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """Short folder-safe device name: 'cpu', or e.g. 'nvidia-h100-80gb-hbm3'."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return "-".join("".join(c if c.isalnum() else " " for c in name).split())


def git_commit() -> str:
    """HEAD's hash, with '+dirty' when tracked files differ from it; VREPA_GIT_COMMIT where there is no git."""
    if os.environ.get("VREPA_GIT_COMMIT"):
        return os.environ["VREPA_GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device) -> Dict[str, str]:
    """Metadata every record carries: device, versions, commit, date."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return dict(device_name=device_name(device), torch_version=torch.__version__, triton_version=triton_version,
                cuda_version=str(torch.version.cuda), python_version=platform.python_version(),
                git_commit=git_commit(), date=datetime.date.today().isoformat(),
                timestamp=datetime.datetime.now().isoformat(timespec="seconds"))
