"""Faults while quantizing: kills at several moments, a read-only and a full filesystem.

Kills run ``omniquant quantize`` on the tiny model in subprocesses (started together, so
the scenarios share the start-up time) and stop each at a moment seen from outside: the
plan printed (model loaded, calibration starting), the temporary directory appearing
(export under way), ``omniquant.json`` appearing in it (audit and rename next). After a
kill the invariant is checked, whatever the exact moment hit: ``--out`` is missing or a
finished checkpoint that passes the shared check and the audit; every leftover is
refused by the shared check and removed by the next run's cleanup.

The filesystem faults mount a small tmpfs (root only; skipped elsewhere).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from omniquant.errors import OmniquantError

REPO = Path(__file__).resolve().parents[2]


def _start(tiny: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "omniquant.cli", "quantize", "--model", str(tiny), "--recipe",
         "fp8_omni", "--out", str(out), "--set", "calibration.size=2", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO,
    )  # fmt: skip


def _temps(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".omniquant-*-{out.name}-*"))


def _moment_reached(moment: str, out: Path, seen_plan: bool) -> bool:
    if moment == "never":
        return False
    if moment == "plan":
        return seen_plan
    temps = [t for t in _temps(out) if t.name.startswith(".omniquant-tmp-")]
    if moment == "tmp_dir":
        return bool(temps)
    return any((t / "omniquant.json").exists() for t in temps)  # "marker"


SCENARIOS = [
    ("plan", signal.SIGTERM),
    ("plan", signal.SIGKILL),
    ("tmp_dir", signal.SIGTERM),
    ("tmp_dir", signal.SIGKILL),
    ("marker", signal.SIGKILL),
    ("never", None),  # runs to the end: also checks that stdout carries no library noise
]


@pytest.mark.slow
def test_kills_never_leave_a_checkpoint_that_passes(tiny_dir, tmp_path):
    from omniquant.checkpoint.audit import audit_checkpoint
    from omniquant.checkpoint.verify import verify_checkpoint
    from omniquant.outdir import clean_stale_temp_dirs

    runs = []
    for i, (moment, sig) in enumerate(SCENARIOS):
        parent = tmp_path / f"run{i}"
        parent.mkdir()
        out = parent / "ckpt"
        runs.append({"moment": moment, "sig": sig, "out": out, "proc": _start(tiny_dir, out),
                     "plan": False, "killed_at": None, "output": b""})  # fmt: skip
    for r in runs:
        os.set_blocking(r["proc"].stdout.fileno(), False)
    deadline = time.time() + 240
    while any(r["proc"].poll() is None for r in runs if r["killed_at"] is None):
        assert time.time() < deadline, "quantize subprocesses did not progress"
        for r in runs:
            proc = r["proc"]
            if proc.poll() is not None or r["killed_at"] is not None:
                continue
            chunk = proc.stdout.read()
            if chunk:
                r["output"] += chunk
                r["plan"] = b"plan (" in r["output"]
            if _moment_reached(r["moment"], r["out"], r["plan"]):
                proc.send_signal(r["sig"])
                r["killed_at"] = r["moment"]
        time.sleep(0.005)

    for r in runs:
        proc, out = r["proc"], r["out"]
        rc = proc.wait(timeout=60)
        label = f"{getattr(r['sig'], 'name', 'no signal')} at {r['moment']}"
        if r["sig"] is None:
            text = (r["output"] + (proc.stdout.read() or b"")).decode()
            assert rc == 0, text
            assert text.rstrip().endswith(f"audit passed; checkpoint at {out}"), text
            # Library noise goes to the log (omniquant.cli.noise), not into the user's output.
            for noise in (
                "\x1b[",
                "UserWarning",
                "Detected fused MoE",
                "Inserted",
                "[transformers]",
                "Loading weights",  # transformers' progress bar (stderr, merged here)
            ):
                assert noise not in text, (noise, text)
        if r["sig"] == signal.SIGTERM:
            # Any moment of the run: an interrupt (temporary directory and lock released,
            # "interrupted", exit 130), never a traceback, or the run had just finished.
            assert rc in (0, 130), (label, r["output"][-2000:])
            assert not (out.parent / f".{out.name}.omniquant-lock").exists(), label
        if out.exists():  # the kill came after the final rename: a finished checkpoint
            verify_checkpoint(out, flag="--out", error=OmniquantError)
            assert audit_checkpoint(out).ok, label
        leftovers = _temps(out)
        if r["sig"] == signal.SIGTERM:
            assert leftovers == [], f"{label}: SIGTERM must clean up, left {leftovers}"
        for left in leftovers:
            with pytest.raises(OmniquantError, match="temporary directory of an unfinished"):
                verify_checkpoint(left, flag="inspect", error=OmniquantError)
        clean_stale_temp_dirs(out, lambda _m: None)
        assert _temps(out) == [], label
        print(
            f"{label}: killed={r['killed_at'] is not None} rc={rc} out={out.exists()} "
            f"leftovers={[p.name.split('-')[1] for p in leftovers]}"
        )
    # The moments before the final rename are wide enough to be hit every time.
    assert all(r["killed_at"] for r in runs if r["moment"] in ("plan", "tmp_dir")), runs


# SIGTERM sent to itself when the CLI first imports ``module`` (deterministic, unlike a
# timer): through ``omniquant.__main__.run``, the console script's entry point.
_TERM_AT_IMPORT = """
import builtins, os, signal, sys
target = sys.argv[1]
real = builtins.__import__
def imp(name, *args, **kwargs):
    if name == target:
        builtins.__import__ = real
        os.kill(os.getpid(), signal.SIGTERM)
    return real(name, *args, **kwargs)
builtins.__import__ = imp
from omniquant.__main__ import run
sys.argv = ["omniquant", *sys.argv[2:]]
sys.exit(run())
"""


@pytest.mark.parametrize(
    "module",
    [
        "typer",  # importing the CLI itself, before omniquant.cli.main runs
        "omniquant.quantize.pipeline",  # the command's stage import, before the lock is taken
        "torch",  # the heavy imports inside the stage, with the lock held
    ],
)
def test_sigterm_during_start_up_imports_is_an_interrupt(tiny_dir, tmp_path, module):
    from corpus_tally import RESULTS

    out = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _TERM_AT_IMPORT, module, "quantize", "--model", str(tiny_dir),
         "--recipe", "fp8_omni", "--out", str(out), "--quiet"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300, check=False,
    )  # fmt: skip
    left = sorted(p.name for p in tmp_path.iterdir())
    ok = proc.returncode == 130 and proc.stderr.strip().endswith("interrupted") and left == []
    RESULTS.append(("kills", ok, "Traceback" in proc.stderr, proc.returncode == 0, False))
    assert proc.returncode == 130, (proc.returncode, proc.stderr[-3000:])
    assert proc.stderr.strip().endswith("interrupted") and "Traceback" not in proc.stderr
    assert left == []  # no lock file, no temporary directory


def _mount_tmpfs(where: Path, size: str, *options: str) -> bool:
    if os.geteuid() != 0:
        return False
    where.mkdir()
    opts = ",".join([f"size={size}", *options])
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
                          capture_output=True, check=False)  # fmt: skip
    return done.returncode == 0


@pytest.fixture
def tmpfs(tmp_path):
    mounted: list[Path] = []

    def mount(name: str, size: str, *options: str) -> Path:
        where = tmp_path / name
        if not _mount_tmpfs(where, size, *options):
            pytest.skip("needs root and permission to mount a tmpfs")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], capture_output=True, check=False)


def test_read_only_output_filesystem_is_refused_before_calibration(tiny_dir, tmpfs, capsys):
    from corpus_tally import RESULTS

    from omniquant.cli import main

    ro = tmpfs("ro", "1m", "ro")
    rc = main(["quantize", "--model", str(tiny_dir), "--recipe", "fp8_omni", "--out",
               str(ro / "ckpt"), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    RESULTS.append(
        ("filesystem", rc == 2 and "Read-only file system" in err, False, rc == 0, False)
    )
    assert rc == 2 and "(Read-only file system); choose a writable --out" in err
    assert "calibrat" not in err


def test_too_little_space_is_refused_before_calibration(tiny_dir, tmpfs, capsys):
    from corpus_tally import RESULTS

    from omniquant.cli import main

    small = tmpfs("small", "512k")
    rc = main(["quantize", "--model", str(tiny_dir), "--recipe", "fp8_omni", "--out",
               str(small / "ckpt"), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    ok = rc == 2 and "predicted export size" in err
    RESULTS.append(("filesystem", ok, False, rc == 0, False))
    assert rc == 2 and "MiB free; the checkpoint needs about" in err
    assert "MiB (the predicted export size: the tensors the recipe's plan writes" in err
    assert list(small.iterdir()) == []


@pytest.mark.usefixtures("one_thread")
def test_a_disk_that_fills_during_the_run_is_a_clean_error(tiny_dir, tmpfs, capsys, monkeypatch):
    """Free space passes pre-flight, then another writer fills the disk before export."""
    from corpus_tally import RESULTS

    from omniquant.checkpoint import verify
    from omniquant.cli import main

    fs = tmpfs("fills", "3m")
    real = verify.check_writable_out

    def check_then_fill(out, need, error):
        real(out, need, error)
        free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
        (fs / "ballast").write_bytes(b"\0" * (free - 128 * 1024))

    monkeypatch.setattr(verify, "check_writable_out", check_then_fill)
    rc = main(["quantize", "--model", str(tiny_dir), "--recipe", "fp8_omni", "--out",
               str(fs / "ckpt"), "--set", "calibration.size=1", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    ok = rc == 2 and "No space left on device" in err
    RESULTS.append(("filesystem", ok, "Traceback" in err, rc == 0, False))
    assert rc == 2, err
    assert f"--out {fs / 'ckpt'}: writing the checkpoint failed (No space left on device" in err
    assert sorted(p.name for p in fs.iterdir()) == ["ballast"]  # no temp dir, no lock file


def test_the_entry_point_freezes_what_is_alive_once_the_command_returns(monkeypatch):
    """``run`` returns the command's code and leaves the objects alive then to the
    collector's permanent generation, so the exit's last collection skips them
    (``omniquant/__main__.py``)."""
    import gc

    import omniquant.cli
    from omniquant.__main__ import run

    codes = iter([3])
    monkeypatch.setattr(omniquant.cli, "main", lambda: next(codes))
    gc.unfreeze()
    try:
        assert gc.get_freeze_count() == 0
        assert run() == 3
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
