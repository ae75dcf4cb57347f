"""Evaluated numbers keep their bits across speed work (issue 26's rule).

The tiny model (seed 0) quantized with the built-in synthetic set, loaded with serving
numerics (``load_emulated``) and evaluated on the shipped omni-smoke set against the BF16
baseline's spans: every per-sample prediction, score, KL and top-1 agreement, and the
baseline's stored span distributions, hash to the pinned digests. float values are
hashed by their exact hex form. A change that means to alter evaluated numbers updates
these pins in the same commit and says why in its message. One torch thread (the
fixture), as the other evaluation tests.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

PINNED = {
    "bf16": "c4dac0d32e278ba84451324301d29871fbe64915a7ebb33f7d4e1e5cb30c6819",
    "fp8_omni": "324e1eec8576d6b401c36b6e8268832c21c5a422db2f88dcce8e1cee8d05859f",
    "nvfp4_omni": "7d885ebe346214d25412ea152ab1377adf8ad0c4a8a141d9bc1113540ddb353e",
}


def _digest(evaluation) -> str:
    def exact(v):
        return v.hex() if isinstance(v, float) else v

    rows = [
        [s.id, s.prediction, exact(s.score), exact(s.wer), exact(s.kl), exact(s.top1),
         s.answer_tokens, s.video_tokens]
        for s in evaluation.samples
    ]  # fmt: skip
    h = hashlib.sha256(json.dumps(rows).encode())
    for sid in sorted(evaluation.spans):
        span = evaluation.spans[sid]
        for t in (span.logprobs, span.indices, span.tail_logprob):
            if isinstance(t, torch.Tensor):
                h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def smoke_items(tiny_dir):
    from omniquant.data.processing import OmniProcessor
    from omniquant.evaluate.tasks import prepare_task_items, validate_task_set

    return prepare_task_items(
        OmniProcessor.from_pretrained(tiny_dir), validate_task_set("omni-smoke")
    )


@pytest.fixture(scope="module")
def baseline(tiny_dir, smoke_items):
    from omniquant.evaluate.emulated import load_emulated
    from omniquant.evaluate.runner import evaluate_model

    return evaluate_model(load_emulated(tiny_dir), smoke_items, keep_spans=True, max_new_tokens=4)


@pytest.mark.parametrize("recipe", sorted(PINNED))
def test_evaluated_numbers_are_pinned(quantized, tiny_dir, smoke_items, baseline, recipe):
    from omniquant.evaluate.emulated import load_emulated
    from omniquant.evaluate.runner import evaluate_model

    if recipe == "bf16":
        got = _digest(baseline)
    else:
        loaded = load_emulated(quantized(recipe))
        got = _digest(
            evaluate_model(loaded, smoke_items, reference=baseline.spans, max_new_tokens=4)
        )
    assert got == PINNED[recipe], f"{recipe}: {got}"
