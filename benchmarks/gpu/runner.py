"""The GPU check's step runner: one JSON file that says, at any moment, what ran, what it
measured, what failed (with its whole traceback) and what did not run and why.

Policy (each line answers a way the first version lost a paid run):
- Every planned step is in the JSON from the start as ``pending`` with its budget and the
  arithmetic behind it; a step about to run is saved as ``running`` first, so a run killed
  at the command's time limit shows where it stopped.
- A failed step keeps ``traceback.format_exc()`` (the whole chain), not only the message.
  Its frames are cleared before memory is released, so a failed quantize does not hold its
  model on the GPU for the next step.
- A step that stops the check (``StopCheck``: the versions are wrong) marks every later
  step ``skipped`` with the reason; so do a missing prerequisite step and a deadline that
  leaves less than the step's budget.
- Peaks are per step: the host's ``VmHWM`` is reset by writing ``5`` to
  ``/proc/self/clear_refs`` (Linux >= 4.0) and each GPU's allocator peak by
  ``torch.cuda.reset_peak_memory_stats``; after every step ``gc.collect()`` then
  ``torch.cuda.empty_cache()`` run and the bytes still allocated are recorded.
- A step has a hard limit (``hard_limit(budget)``) enforced with ``SIGALRM`` between Python
  calls: one stuck step cannot take the others' time.

Written here rather than taken from a library: pytest would give tracebacks but not
per-step peaks, budgets and a JSON that survives a ``kill -9``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

#: Characters of a traceback kept (the end: where it was raised).
TRACEBACK_CHARS = 20000


class StopCheck(Exception):
    """Raised by a step when nothing after it can mean anything (wrong versions)."""


class StepTimeout(Exception):
    """A step ran past its hard limit."""


@dataclass
class Step:
    """One step of the check: ``fn() -> dict`` of what it measured."""

    name: str
    fn: Callable[[], dict]
    budget_s: float
    arithmetic: str
    needs: tuple[str, ...] = ()
    #: Seconds after which the step is interrupted (default ``hard_limit(budget_s)``).
    limit_s: float | None = None
    info: dict = field(default_factory=dict)


def hard_limit(budget_s: float) -> float:
    """Twice the budget plus 30 s: an estimate may be off, a hang may not."""
    return 2 * budget_s + 30


# ---------------------------------------------------------------- memory


def host_peak_bytes() -> int | None:
    """``VmHWM`` (peak resident set since start or the last reset), None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def host_rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_host_peak() -> bool:
    """Reset ``VmHWM`` to the current resident set; False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _cuda():
    import torch

    return torch.cuda if torch.cuda.is_available() else None


def reset_gpu_peaks() -> None:
    cuda = _cuda()
    if cuda is not None:
        for i in range(cuda.device_count()):
            cuda.reset_peak_memory_stats(i)


def gpu_peaks() -> dict[str, int]:
    cuda = _cuda()
    if cuda is None:
        return {}
    return {f"cuda:{i}": int(cuda.max_memory_allocated(i)) for i in range(cuda.device_count())}


def gpu_allocated() -> dict[str, int]:
    cuda = _cuda()
    if cuda is None:
        return {}
    return {f"cuda:{i}": int(cuda.memory_allocated(i)) for i in range(cuda.device_count())}


def release_memory() -> str | None:
    """Collect reference cycles (modelopt's quantizers hold some), then return the cached
    GPU blocks: ``empty_cache`` alone frees nothing a cycle still holds. Returns the error
    of a GPU left broken by the step (an illegal access surfaces at the synchronize)
    instead of raising it into the runner."""
    gc.collect()
    try:
        cuda = _cuda()
        if cuda is not None:
            cuda.synchronize()
            cuda.empty_cache()
    except Exception as exc:  # noqa: BLE001 - recorded; the next step shows what still works
        return f"{type(exc).__name__}: {exc}"
    return None


# ---------------------------------------------------------------- time limit


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise ``StepTimeout`` in the main thread after ``seconds`` (no-op elsewhere)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(_sig, _frame):
        raise StepTimeout(f"ran past its hard limit of {seconds:.0f} s")

    before = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


# ---------------------------------------------------------------- runner


class Runner:
    """Runs steps in order, recording each in ``result["steps"]`` and saving to ``out``."""

    def __init__(self, out: Path, result: dict, deadline_s: float | None = None, log=print,
                 enforce_limits: bool = True):  # fmt: skip
        self.out = out
        self.enforce_limits = enforce_limits
        self.result = result
        self.t0 = time.monotonic()
        self.deadline_s = deadline_s
        self.log = log
        result.setdefault("steps", {})

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.result, indent=2, default=str) + "\n")
        tmp.replace(self.out)  # a kill mid-write leaves the previous complete file

    def plan(self, steps: list[Step]) -> float:
        """Record every step as pending and print the budget table; returns the total."""
        total = sum(s.budget_s for s in steps)
        self.log(f"[gpu_check] plan: {len(steps)} steps, estimated {total:.0f} s in all")
        for s in steps:
            if self.result["steps"].get(s.name, {}).get("status", "pending") != "pending":
                self.log(f"[gpu_check]   {s.name:<24} {s.budget_s:6.0f} s  (done)")
                continue
            self.result["steps"][s.name] = {
                "status": "pending", "budget_s": round(s.budget_s, 1),
                "limit_s": round(s.limit_s or hard_limit(s.budget_s), 1), "arithmetic": s.arithmetic,
                **s.info,
            }  # fmt: skip
            self.log(f"[gpu_check]   {s.name:<24} {s.budget_s:6.0f} s  {s.arithmetic}")
        self.result["estimated_total_s"] = round(total, 1)
        self.save()
        return total

    def seconds_left(self) -> float | None:
        if self.deadline_s is None:
            return None
        return self.deadline_s - (time.monotonic() - self.t0)

    def _skip_reason(self, step: Step, stopped: str | None) -> str | None:
        if stopped:
            return f"not run: {stopped}"
        steps = self.result["steps"]
        bad = [n for n in step.needs if steps.get(n, {}).get("status") != "ok"]
        if bad:
            return f"not run: needs {', '.join(bad)} to pass"
        left = self.seconds_left()
        if left is not None and left < step.budget_s:
            return f"not run: {left:.0f} s left before the deadline, budget {step.budget_s:.0f} s"
        return None

    def run(self, steps: list[Step]) -> dict:
        stopped: str | None = None
        for step in steps:
            entry = self.result["steps"].setdefault(step.name, {"budget_s": step.budget_s})
            if entry.get("status") in ("ok", "failed", "skipped"):
                continue  # ran in an earlier call (the versions, before the pre-flight)
            reason = self._skip_reason(step, stopped)
            if reason:
                entry.update(status="skipped", reason=reason)
                self.log(f"[gpu_check] {step.name}: skipped ({reason})")
                self.save()
                continue
            stopped = self._run_one(step, entry)
        self.result["finished"] = True
        self.save()
        return self.result

    def _run_one(self, step: Step, entry: dict) -> str | None:
        entry.update(status="running", started_unix=time.time())
        self.save()
        self.log(f"[gpu_check] {step.name}: running (budget {step.budget_s:.0f} s)")
        release_memory()
        entry["host_peak_reset"] = reset_host_peak()
        reset_gpu_peaks()
        limit = (step.limit_s or hard_limit(step.budget_s)) if self.enforce_limits else None
        left = self.seconds_left()
        if left is not None and limit is not None:
            limit = max(1.0, min(limit, left))
        stop = None
        t0 = time.perf_counter()
        try:
            with time_limit(limit):
                measured = step.fn()
            entry.update(status="ok", **(measured or {}))
        except Exception as exc:  # noqa: BLE001 - recorded with its traceback; the next step runs
            entry.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:4000],
                         traceback=traceback.format_exc()[-TRACEBACK_CHARS:])  # fmt: skip
            if isinstance(exc, StopCheck):
                stop = f"{step.name} failed: {exc}"
            # The traceback's frames hold the step's locals (a model on the GPU): drop them.
            traceback.clear_frames(exc.__traceback__)
            del exc
            sys.last_traceback = sys.last_value = None
        entry["wall_s"] = round(time.perf_counter() - t0, 2)
        entry["over_budget"] = entry["wall_s"] > step.budget_s
        entry["peak_host_bytes"] = host_peak_bytes()
        try:
            entry["peak_gpu_bytes"] = gpu_peaks()
        except Exception as exc:  # noqa: BLE001 - a broken CUDA context must not end the run
            entry["peak_gpu_bytes"] = f"{type(exc).__name__}: {exc}"
        cleanup = release_memory()
        if cleanup:
            entry["cleanup_error"] = cleanup
        try:
            entry["gpu_allocated_after_bytes"] = gpu_allocated()
        except Exception as exc:  # noqa: BLE001
            entry["gpu_allocated_after_bytes"] = f"{type(exc).__name__}: {exc}"
        entry["host_rss_after_bytes"] = host_rss_bytes()
        shown = {k: v for k, v in entry.items() if k not in ("traceback", "arithmetic")}
        self.log(f"[gpu_check] {step.name}: {json.dumps(shown, default=str)[:800]}")
        if entry["status"] == "failed":
            self.log(entry["traceback"])
        self.save()
        return stop
