"""Shared, remembering activation quantizers (issue 26): linears reading the same tensor
under the same input scale quantize it once, with the bits of quantizing it each time."""

from __future__ import annotations

import pytest
import torch

from omniquant.evaluate.shared_input import RememberingQuantizer, SharedQuantizers
from omniquant.numerics import fp8_activation_quantizer, nvfp4_activation_quantizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _counting(quantize, calls: list):
    def counted(x):
        calls.append(tuple(x.shape))
        return quantize(x)

    return counted


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


@pytest.mark.parametrize("make", [nvfp4_activation_quantizer, fp8_activation_quantizer])
def test_same_unchanged_memory_is_quantized_once_and_anything_else_again(make):
    plain = make(0.002)
    calls: list = []
    shared = RememberingQuantizer(_counting(make(0.002), calls))
    x = (torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0)) * 0.3).bfloat16()

    first = shared(x)
    assert torch.equal(_bits(first), _bits(plain(x))) and len(calls) == 1
    # The same memory in another shape with the same last dimension: remembered.
    again = shared(x.view(-1, 64))
    assert again.shape == (10, 64) and torch.equal(_bits(again), _bits(plain(x.view(-1, 64))))
    assert len(calls) == 1
    # Equal values in other memory, a slice, another last dimension: quantized again.
    for other in (x.view(2, 5, 4, 16), x.clone(), x[1]):
        assert torch.equal(_bits(shared(other)), _bits(plain(other)))
    assert len(calls) == 4
    shared(x)
    n = len(calls)
    # An in-place write to the input (through a view) or to the kept result: quantized again.
    x.view(-1)[:64].mul_(3)
    assert torch.equal(_bits(shared(x)), _bits(plain(x))) and len(calls) == n + 1
    shared(x).add_(1)  # remembered (no call), then written
    assert torch.equal(_bits(shared(x)), _bits(plain(x))) and len(calls) == n + 2
    with torch.inference_mode():  # no version counter: never remembered
        y = x.clone()
        assert torch.equal(_bits(shared(y)), _bits(plain(y)))
        assert torch.equal(_bits(shared(y)), _bits(plain(y))) and len(calls) == n + 4


def test_shared_quantizers_are_one_per_format_and_scale_bytes():
    made = []
    shared = SharedQuantizers(lambda fmt, scale: made.append((fmt, float(scale))) or (lambda x: x))
    a = shared.get("nvfp4", torch.tensor([0.0015]))
    assert shared.get("nvfp4", torch.tensor(0.0015).reshape(1)) is a
    assert shared.get("fp8", torch.tensor([0.0015])) is not a
    assert shared.get("nvfp4", torch.tensor([0.0015]).nextafter(torch.tensor(1.0))) is not a
    assert len(made) == 3


def test_sharing_gives_the_evaluated_bits_of_quantizing_each_input(
    quantized, tiny_dir, monkeypatch
):
    """The tiny model under NVFP4 on every linear: q/k/v and each MoE's experts and shared
    expert share their input quantize; every evaluated number equals the unshared run's."""
    from omniquant.data.processing import OmniProcessor
    from omniquant.evaluate.emulated import load_emulated
    from omniquant.evaluate.runner import evaluate_model
    from omniquant.evaluate.tasks import prepare_task_items, validate_task_set

    items = prepare_task_items(
        OmniProcessor.from_pretrained(tiny_dir), validate_task_set("omni-smoke")
    )
    loaded = load_emulated(quantized("nvfp4_aggressive"))
    hits = []
    same = RememberingQuantizer._same_unchanged

    def counted(self, x):
        hits.append(same(self, x))
        return hits[-1]

    monkeypatch.setattr(RememberingQuantizer, "_same_unchanged", counted)
    shared = evaluate_model(loaded, items, keep_spans=True, max_new_tokens=4)
    assert sum(hits) > 0
    monkeypatch.setattr(RememberingQuantizer, "_same_unchanged", lambda self, x: False)
    unshared = evaluate_model(loaded, items, keep_spans=True, max_new_tokens=4)

    def rows(ev):
        return [(s.id, s.prediction, repr(s.score), repr(s.wer)) for s in ev.samples]

    assert rows(shared) == rows(unshared)
    assert shared.spans.keys() == unshared.spans.keys()
    for sid, span in unshared.spans.items():
        got = shared.spans[sid]
        assert torch.equal(got.logprobs.view(torch.int32), span.logprobs.view(torch.int32))
        for a, b in ((got.indices, span.indices), (got.tail_logprob, span.tail_logprob)):
            assert (a is None and b is None) or torch.equal(a, b)
