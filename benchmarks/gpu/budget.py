"""Time and disk arithmetic of the GPU check, stated so it can be checked against what a
run measures (each step records its wall seconds beside its budget).

Rates assumed on one H100 host (16 cores, local disk); they are estimates, not
measurements, and the first run's JSON is what corrects them:
- ``DISK_WRITE`` 1 GiB/s and ``DISK_READ`` 2 GiB/s (safetensors save and load);
- ``EXPORT`` 0.5 GiB of source per second (per-unit quantize, pack, write; CPU-bound);
- ``CALIB_PER_SAMPLE`` 1.5 s per calibration sample at real width with every expert run;
- ``PROCESS`` 8 s of fixed cost per quantize run (plan on meta, tokenizer, record);
- ``TINY_QUANTIZE`` 5 s per quantize run of the tiny preset;
- the suite's GPU tests 40 s (a pytest process: 15 s imports, 5 s tiny build, 15 s tiny
  NVFP4 calibration and export on CUDA, 5 s numerics); the extension build 90 s (two nvcc
  builds of ~45 s with ``MAX_JOBS=16``; the issue saw 1-2 minutes).

The total must stay within ``TOTAL_BUDGET_S`` (6 minutes) so a 10-minute command leaves
room and the 15 minutes of device time allow a rerun on the warm machine; the layer
count is lowered until both the time and the disk fit.
"""

from __future__ import annotations

GiB = 2**30
DISK_WRITE = 1.0 * GiB
DISK_READ = 2.0 * GiB
EXPORT = 0.5 * GiB
CALIB_PER_SAMPLE = 1.5
PROCESS = 8.0
TINY_QUANTIZE = 5.0
SUITE_TESTS_S = 40.0
EXT_BUILD_S = 90.0
EXT_BUILD_LIMIT_S = 150.0
VERSIONS_S = 5.0
#: The pre-flight's two meta-device builds (the real-width source and the compare model).
PREFLIGHT_S = 15.0
TOTAL_BUDGET_S = 360.0
#: Disk kept free beyond the largest phase (logs, tokenizer, the offload folder).
DISK_MARGIN = 2 * GiB
MIN_LAYERS = 2


def source_bytes(sizes: dict, layers: int) -> int:
    """BF16 bytes of a source with the first ``layers`` text layers of ``sizes``."""
    return sizes["rest"] + sum(sizes["layers"][:layers])


def quantize_seconds(src: int, samples: int) -> tuple[float, str]:
    """One quantize run at real width: finite check + load + calibration + export + audit
    (the output, at most the source's size, read once)."""
    s = (
        PROCESS
        + src / DISK_READ
        + src / DISK_READ
        + samples * CALIB_PER_SAMPLE
        + src / EXPORT
        + src / DISK_READ
    )
    g = src / GiB
    return s, (f"{PROCESS:.0f} + 3 x {g:.1f} GiB / 2 GiB/s (check, load, audit) + {samples} x "
               f"{CALIB_PER_SAMPLE} s + {g:.1f} GiB / 0.5 GiB/s (export)")  # fmt: skip


def compare_seconds(src: int, samples: int) -> tuple[float, str]:
    """Step 4: tensors (10 s) + build and save + float32 load + calibration + export +
    reading both checkpoints + the emulated load + logits (3 s)."""
    g = src / GiB
    s = (
        10
        + 3
        + src / DISK_WRITE
        + src / DISK_READ
        + samples * CALIB_PER_SAMPLE
        + src / EXPORT
        + 2 * src / DISK_READ
        + 3
    )
    return s, (f"16 + {g:.1f} GiB / 1 GiB/s (save) + 3 x {g:.1f} GiB / 2 GiB/s (load, read back, "
               f"emulated load) + {samples} x {CALIB_PER_SAMPLE} s + {g:.1f} GiB / 0.5 GiB/s (export)")  # fmt: skip


def build_seconds(src: int) -> tuple[float, str]:
    return 5 + src / DISK_WRITE, f"5 s init on the GPU + {src / GiB:.1f} GiB / 1 GiB/s (save)"


def disk_needed(src: int, compare_src: int) -> int:
    """The largest phase: a source plus its output (at most the source's size)."""
    return 2 * max(src, compare_src) + DISK_MARGIN


def fit_layers(
    sizes: dict,
    layers: int,
    compare_src: int,
    free_disk: int,
    fixed_s: float,
    samples: int,
    recipes: int,
) -> dict:
    """The largest layer count <= ``layers`` whose run fits the disk and the total budget."""
    reasons = []
    n = layers
    while True:
        src = source_bytes(sizes, n)
        need = disk_needed(src, compare_src)
        total = fixed_s + build_seconds(src)[0] + recipes * quantize_seconds(src, samples)[0]
        over = []
        if need > free_disk:
            over.append(
                f"disk: {n} layers need {need / GiB:.1f} GiB, {free_disk / GiB:.1f} GiB free"
            )
        if total > TOTAL_BUDGET_S:
            over.append(f"time: {n} layers estimate {total:.0f} s > {TOTAL_BUDGET_S:.0f} s")
        if not over or n <= MIN_LAYERS:
            return {"layers": n, "requested": layers, "source_bytes": src, "disk_needed": need,
                    "free_disk": free_disk, "lowered_because": reasons, "fits": not over}  # fmt: skip
        reasons += over
        n -= 1
