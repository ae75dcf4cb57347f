"""Calibration algorithms: the bytes of modelopt's CUDA path against omniquant's CPU seam.

For each algorithm whose NVFP4 fake quant runs through ``omniquant.quantize.modelopt_cpu``
on the CPU (mse, four_over_six, local_hessian, gptq), quantize the tiny model (seed 0) with
``nvfp4_aggressive:<algorithm>`` twice: ``--device cpu`` (the seam: omniquant's numerics)
and ``--device cuda`` (modelopt's Triton/CUDA kernels), then compare every tensor of the
two exports: identical, or how many bytes differ and in which tensors (E2M1 ties may
round differently: Triton's ``div.full.f32`` is not IEEE division, see
``omniquant/numerics/nvfp4.py``; GPU matmuls in the calibration forward differ in the last
bits from the CPU's, so input scales and Hessians can differ a little too).

Writes one JSON (``--out``). Needs a CUDA GPU; on a machine without one it writes the
reason and exits 0. Not run in this repository's CPU sessions: no number from it is
claimed anywhere until a GPU run writes one.

    python benchmarks/gpu/algorithms_cpu_vs_cuda.py --out algorithms_cpu_vs_cuda.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

ALGORITHMS = ("max", "mse", "four_over_six", "local_hessian", "gptq")


def compare_exports(a: Path, b: Path) -> dict:
    """Per tensor: equal, or the number of differing bytes."""
    import torch
    from safetensors import safe_open

    def tensors(d: Path) -> dict:
        out = {}
        for shard in sorted(d.glob("*.safetensors")):
            with safe_open(shard, "pt") as fh:
                for k in fh.keys():  # noqa: SIM118
                    t = fh.get_tensor(k)
                    out[k] = t.contiguous().view(-1).view(torch.uint8)
        return out

    ta, tb = tensors(a), tensors(b)
    differ = {}
    for k in sorted(set(ta) | set(tb)):
        if k not in ta or k not in tb or ta[k].numel() != tb[k].numel():
            differ[k] = "missing or different size"
        elif not bool((ta[k] == tb[k]).all()):
            differ[k] = int((ta[k] != tb[k]).sum())
    return {"tensors": len(ta), "identical": not differ, "differing": differ}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("algorithms_cpu_vs_cuda.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        args.out.write_text(json.dumps({"skipped": "no CUDA device"}) + "\n")
        print("skipped: no CUDA device")
        return
    from omniquant.demo.tiny import make_tiny
    from omniquant.quantize.pipeline import quantize

    work = Path(tempfile.mkdtemp(prefix="algos-cpu-cuda-"))
    model = make_tiny(work / "model", seed=0)
    result: dict = {"device": torch.cuda.get_device_name(0), "algorithms": {}}
    for algo in ALGORITHMS:
        spec = f"nvfp4_aggressive:{algo}"
        outs = {}
        for device in ("cpu", "cuda"):
            outs[device] = quantize(
                model, spec, work / f"{algo}-{device}", calib="synthetic", device=device
            ).out
        result["algorithms"][algo] = compare_exports(outs["cpu"], outs["cuda"])
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(algo, result["algorithms"][algo]["identical"])


if __name__ == "__main__":
    main()
