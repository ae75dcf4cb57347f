"""Calibration algorithms at the released widths: one GEMM per layer kind, CPU time per GEMM.

For one routed-expert GEMM (``up_proj``: [1856, 2688]), the Mamba ``in_proj``
([10304, 2688]) and an attention ``q_proj`` ([4096, 2688]) of Nemotron 3 Nano Omni, each
as an NVFP4 ``nn.Linear`` with seeded random BF16 weights (normal, std 0.02: not the
released weights, whose outliers decide how much a search gains), run modelopt's
algorithm through omniquant's CPU seam and measure:

- relative weight error ``||W - Wq||_F / ||W||_F`` and relative output error
  ``||X (W - Wq)^T|| / ||X W^T||`` on 256 held-out random tokens;
- CPU seconds of ``mtq.quantize`` (one thread) and the extrapolation to the released model:
  seconds x the number of GEMMs of that kind under ``nvfp4_aggressive`` (5,888 routed-expert
  GEMMs, 23 Mamba ``in_proj``, 6 ``q_proj``).

GPTQ is not run at these widths: modelopt's CPU path fake-quantizes the whole matrix once
per input column (``gptq_blockwise_update``), and its cost is reported from the same
estimate ``quantize`` prints (``omniquant.quantize.algorithm_run``). Every number is this
CPU's. Run:

    .venv/bin/python benchmarks/bench_algorithm_layers.py [--algorithms max,mse,four_over_six]
        [--out benchmarks/results/bench_algorithm_layers.json]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

#: kind -> ([out, in], GEMMs of this kind in the released model under nvfp4_aggressive).
LAYERS = {
    "routed_expert_up_proj": ((1856, 2688), 128 * 2 * 23),
    "mamba_in_proj": ((10304, 2688), 23),
    "attention_q_proj": ((4096, 2688), 6),
}


def _cfg(algo_name: str) -> dict:
    from omniquant.formats import FORMATS
    from omniquant.quantize.algorithms import get_algorithm

    algo = get_algorithm(algo_name)
    base = FORMATS["nvfp4"].modelopt_cfg
    wcfg = base
    if algo.static_nvfp4_weights:
        bs = {**base["block_sizes"], "type": "static"}
        if algo.four_over_six:
            bs["four_over_six"] = True
        wcfg = {**base, "block_sizes": bs}
    return {
        "quant_cfg": [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*weight_quantizer", "cfg": wcfg},
            {"quantizer_name": "*input_quantizer", "cfg": base},
        ],
        "algorithm": algo.modelopt_algorithm({"nvfp4"}) if algo_name != "max" else "max",
    }


def measure_layer(shape: tuple[int, int], algo: str, seed: int = 0) -> dict:
    import modelopt.torch.quantization as mtq
    import torch

    from omniquant.quantize.modelopt_cpu import cpu_nvfp4_fake_quant

    out_f, in_f = shape
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=g) * 0.02).to(torch.bfloat16)
    x_cal = torch.randn(256, in_f, generator=g).to(torch.bfloat16)
    x_test = torch.randn(256, in_f, generator=g).float()
    model = torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16))
    model[0].weight.data.copy_(w)
    with cpu_nvfp4_fake_quant(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.process_time()
        mtq.quantize(model, _cfg(algo), lambda m: m(x_cal))
        seconds = time.process_time() - t
        wq = model[0].weight_quantizer(model[0].weight.detach()).float()
    wf = w.float()
    return {
        "cpu_seconds": seconds,
        "weight_rel_error": float((wf - wq).norm() / wf.norm()),
        "output_rel_error": float((x_test @ (wf - wq).T).norm() / (x_test @ wf.T).norm()),
    }


def main() -> None:
    import torch

    from omniquant.quantize.algorithm_run import _fake_quant_rate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algorithms", default="max,mse,four_over_six,local_hessian")
    ap.add_argument("--kinds", default=",".join(LAYERS))
    ap.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/bench_algorithm_layers.json")
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    rate = _fake_quant_rate()
    result: dict = {"threads": 1, "fake_quant_elements_per_s": rate, "layers": {}}
    for kind in args.kinds.split(","):
        shape, count = LAYERS[kind]
        rows = {}
        for algo in args.algorithms.split(","):
            r = measure_layer(shape, algo)
            r["released_model_cpu_hours"] = r["cpu_seconds"] * count / 3600
            rows[algo] = r
            print(kind, algo, json.dumps(r), flush=True)
            result["layers"][kind] = {
                "shape": shape,
                "gemms_in_released_model": count,
                "algorithms": rows,
            }
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        out_f, in_f = shape
        gptq_s = in_f * out_f * in_f / rate
        rows["gptq_estimate"] = {
            "cpu_seconds": gptq_s,
            "released_model_cpu_hours": gptq_s * count / 3600,
            "note": "estimate, not run: one whole-matrix fake quant per input column",
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
