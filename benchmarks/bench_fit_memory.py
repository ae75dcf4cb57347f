"""Peak host memory of fit's composition phase (the Composer built, two whole-layout
probes), on the ``bench`` tiny model (make_tiny size ``bench``, ~645 MB in BF16), in a
fresh process (``benchmarks._memwatch``: VmRSS and RssAnon peaks over the baseline).

Run: ``python benchmarks/bench_fit_memory.py [ROOT]``: ROOT is the omniquant source tree
to measure (default this checkout; give an extracted older commit to compare, e.g.
``git archive 8f2b3d5 | tar -x -C /tmp/before``). The model and the max exports are
written once under /tmp/i22 and reused.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._memwatch import measure


def run(root: str) -> dict:
    """Peak memory of the composition phase with the omniquant tree at ``root``."""
    return measure(_SETUP.replace("ROOT", repr(root)), _BODY)


_SETUP = """
import sys, tempfile, gc, time
sys.path.insert(0, ROOT)
import torch
torch.set_num_threads(1)
import omniquant
assert omniquant.__file__.startswith(ROOT), omniquant.__file__
from pathlib import Path
from omniquant.experiments import fit as F
from omniquant.evaluate.emulated import load_emulated
from omniquant.evaluate.logit_kl import sample_logprobs
from omniquant.quantize.pipeline import load_calibration_samples
model = Path("/tmp/i22/benchmodel")
if not model.exists():
    from omniquant.demo.tiny import make_tiny
    make_tiny(model, seed=0, size="bench")
s = F.prepare_fit(model, calib="synthetic", samples=1, calib_size=2, algorithms="max")
tmp = Path("/tmp/i22/bench_exports"); tmp.mkdir(exist_ok=True)
exports = {("max", f): tmp / f"max-{f}" for f in ("fp8", "nvfp4")}
if not all(p.exists() for p in exports.values()):
    exports = F._calibrate_all(s, tmp, lambda m: None)
base = load_emulated(s.model_dir)
batch, _ = load_calibration_samples(base, s.calib, s.samples, seed=0)
ref = sample_logprobs(base, batch)
del base; gc.collect()
layout = {u.name: "nvfp4" for u in s.units}
print("bf16 bytes", s.costs.bf16_bytes, file=sys.stderr)
"""
_BODY = """
c = F.Composer(s.model_dir, exports, s.costs.hub_modules, batch, ref)
c.kl(layout, kv_cache=True)
c.kl({u.name: "fp8" for u in s.units}, kv_cache=True)
"""
if __name__ == "__main__":
    root = sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[1])
    print(root, json.dumps(run(root)))
