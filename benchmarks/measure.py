"""The one timer, peak memory and the run's environment, shared by every benchmark script here.

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


def add_repeat_args(parser, what: str = "timed rounds") -> None:
    """The repeat options that every benchmark CLI here shares."""
    parser.add_argument("--min-reps", type=int, default=5, help=f"{what} at least")
    parser.add_argument("--max-reps", type=int, default=50, help=f"{what} at most")
    parser.add_argument("--min-time", type=float, default=1.0, help=f"seconds of {what} at least")
    parser.add_argument("--max-time", type=float, default=15.0, help=f"seconds of {what} at most")


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is an out-of-memory failure (CUDA or host)."""
    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(
        s in text for s in ("out of memory", "failed to allocate", "can't allocate memory"))


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- timing
def time_ms(step: Callable[[], object], device: torch.device) -> float:
    """The timer: one call of ``step`` in ms. CUDA: events around the call, the queue drained first.
    CPU: ``time.perf_counter``."""
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
                     max_reps: int = 50, min_time_s: float = 1.0, max_time_s: float = 15.0,
                     on_error: Optional[Callable[[str, BaseException], None]] = None) -> Dict[str, List[float]]:
    """Time every (warmed-up) step once per round until ``min_reps`` rounds and ``min_time_s`` have passed;
    stop at ``max_reps`` rounds, or at ``max_time_s`` once 3 rounds are done. A step that raises leaves
    the rotation and goes to ``on_error`` (re-raised when that is None)."""
    times: Dict[str, List[float]] = {name: [] for name in steps}
    live, rounds, t_start = list(steps), 0, time.perf_counter()
    while live and rounds < max_reps:
        for name in live[rounds % len(live):] + live[:rounds % len(live)]:
            try:
                times[name].append(time_ms(steps[name], device))
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


def summarize_ms(samples: List[float]) -> Dict[str, float]:
    """Median, quartiles and range of repeated timings."""
    s = sorted(samples)
    p25, _, p75 = statistics.quantiles(s, n=4, method="inclusive") if len(s) >= 2 else (s[0],) * 3
    return dict(time_ms_median=statistics.median(s), time_ms_p25=p25, time_ms_p75=p75, time_ms_min=s[0],
                time_ms_max=s[-1], reps=len(s))


def foreign_cpu_cores(run: Callable[[], object]):
    """``(run(), cores that other processes kept busy meanwhile)``: how much a shared machine disturbed a
    CPU timing, from /proc/stat (None where it cannot be read)."""
    def sample():
        try:
            with open("/proc/stat") as f:  # cpu  user nice system idle iowait irq softirq steal ...
                ticks = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        own = os.times()  # this process, all threads
        return sum(ticks) - ticks[3] - ticks[4], (own.user + own.system) * os.sysconf("SC_CLK_TCK"), time.monotonic()

    before = sample()
    out = run()
    after = sample()
    if before is None or after is None or after[2] <= before[2]:
        return out, None
    busy, own, wall = (b - a for a, b in zip(before, after))
    return out, max(0.0, (busy - own) / os.sysconf("SC_CLK_TCK") / wall)


# ---------------------------------------------------------------------------------------------- memory
def _vm_kib(key: str) -> Optional[int]:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def peak_memory_mb(step: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak memory growth of one call of ``step`` in MiB, above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU (Linux; None elsewhere): the growth of
    the process's peak resident set (VmHWM), reset to the current size before the call. glibc keeps freed
    heap pages for reuse, which would hide growth, so they are handed back to the OS first (malloc_trim).
    """
    release_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        base = _vm_kib("VmRSS")
        step()
        return (_vm_kib("VmHWM") - base) / 1024
    except (OSError, AttributeError, StopIteration):
        return None


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
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """Short folder-safe device name: 'cpu', or e.g. 'nvidia-h100-80gb-hbm3'."""
    if device.type != "cuda":
        return "cpu"
    return "-".join("".join(c if c.isalnum() else " " for c in torch.cuda.get_device_name(device).lower()).split())


def git_commit() -> str:
    """HEAD's hash, with '+dirty' when tracked files differ from it; VREPA_GIT_COMMIT where there is no git."""
    if os.environ.get("VREPA_GIT_COMMIT"):
        return os.environ["VREPA_GIT_COMMIT"]
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO_ROOT, capture_output=True, text=True,
                                    check=True).stdout.strip()
    try:
        return git("rev-parse", "--short=12", "HEAD") + ("+dirty" if git("status", "--porcelain", "-uno") else "")
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
