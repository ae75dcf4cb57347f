"""Task sets, metrics, fidelity and the evaluation loop (tiny model, shipped omni-smoke)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from omniquant.errors import DataError
from omniquant.evaluate.fidelity import SpanDistribution
from omniquant.evaluate.metrics import exact_match, normalize_answer, score_sample, word_error_rate
from omniquant.evaluate.tasks import (
    TASKS_ROOT_ENV,
    TaskEntry,
    prepare_task_items,
    resolve_task_set,
    shipped_task_sets,
    validate_task_set,
)
from omniquant.report.stats import paired_bootstrap_ci, recovery

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "tasks" / "omni-smoke"


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ task sets


def test_shipped_smoke_set_covers_every_modality_and_metric():
    assert "omni-smoke" in shipped_task_sets()
    assert resolve_task_set("omni-smoke") == SMOKE
    entries = validate_task_set("omni-smoke")
    assert 8 <= len(entries) <= 12
    assert {e.modality for e in entries} == {"text", "image", "video", "audio"}
    assert {e.metric for e in entries} == {"exact_match", "multiple_choice", "wer"}
    assert sum((SMOKE / p).stat().st_size for e in entries for p in e.media_relpaths()) < 200_000


def test_smoke_generator_is_deterministic(tmp_path: Path):
    import importlib.util
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    try:
        spec = importlib.util.spec_from_file_location(
            "make_smoke_tasks", REPO / "scripts" / "make_smoke_tasks.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "scripts"))
    out = module.generate(tmp_path / "smoke")
    assert (out / "tasks.jsonl").read_text() == (SMOKE / "tasks.jsonl").read_text()
    # Media bytes depend on Pillow/FFmpeg/libsndfile versions; the set must at least validate.
    assert len(validate_task_set(out)) == len(validate_task_set(SMOKE))


def test_unknown_task_set_lists_shipped_names(monkeypatch, tmp_path: Path):
    with pytest.raises(DataError) as info:
        resolve_task_set("omni-smok")
    assert str(info.value).startswith(
        "Unknown task set 'omni-smok': it is neither a shipped set nor a directory."
    )
    assert "omni-smoke" in str(info.value)
    with pytest.raises(DataError, match=r"has no tasks.jsonl"):
        resolve_task_set(tmp_path)
    shutil.copytree(SMOKE, tmp_path / "mine" / "local-set")
    monkeypatch.setenv(TASKS_ROOT_ENV, str(tmp_path / "mine"))
    assert shipped_task_sets() == ["local-set"]
    assert resolve_task_set("local-set") == (tmp_path / "mine" / "local-set").resolve()


def test_bad_task_set_lists_every_bad_line(tmp_path: Path):
    (tmp_path / "media").mkdir()
    shutil.copy(SMOKE / "media" / "img-circle.png", tmp_path / "media" / "ok.png")
    (tmp_path / "media" / "broken.png").write_bytes(b"not a png")
    good = {
        "id": "g",
        "task": "t1",
        "modality": "text",
        "prompt": "p",
        "answer": "a",
        "metric": "exact_match",
    }
    lines = [
        good,
        {**good, "id": "no-answer", "answer": None},
        {**good, "id": "mc-no-choices", "task": "t2", "metric": "multiple_choice"},
        {
            **good,
            "id": "mc-bad-answer",
            "task": "t2",
            "metric": "multiple_choice",
            "choices": ["x", "y"],
        },
        {**good, "id": "img-missing", "modality": "image"},
        {**good, "id": "img-broken", "modality": "image", "image": "media/broken.png"},
        {**good, "id": "img-gone", "modality": "image", "image": "media/gone.png"},
        {**good, "id": "extra", "colour": "red"},
        {**good, "id": "mixed-metric", "metric": "wer"},
        {**good, "id": "choices-wrong-metric", "choices": ["a", "b"]},
        good,
        {**good, "id": "ok-image", "modality": "image", "image": "media/ok.png"},
    ]
    text = "\n".join(json.dumps(x) for x in lines) + "\n{not json\n"
    (tmp_path / "tasks.jsonl").write_text(text)
    with pytest.raises(DataError) as info:
        validate_task_set(tmp_path)
    msg = str(info.value)
    assert msg.startswith(f"Task set {tmp_path / 'tasks.jsonl'}: 11 of 13 samples are bad:")
    for expected in (
        "line 2 (id 'no-answer'): field 'answer': Input should be a valid string",
        "line 3 (id 'mc-no-choices'): metric 'multiple_choice' needs 'choices' with at least 2 options",
        "line 4 (id 'mc-bad-answer'): answer 'a' is not one of the choices ['x', 'y']",
        "line 5 (id 'img-missing'): modality 'image' but the line has no 'image' file",
        "line 6 (id 'img-broken'): media/broken.png:",
        "line 7 (id 'img-gone'): media/gone.png:",
        "line 8 (id 'extra'): unknown field 'colour'",
        "line 9 (id 'mixed-metric'): task 't1' uses metric 'exact_match' on line 1 but 'wer' here",
        "line 10 (id 'choices-wrong-metric'): 'choices' is only for metric 'multiple_choice'",
        "line 11 (id 'g'): duplicate id 'g' (first on line 1)",
        "line 13: bad JSON:",
    ):
        assert expected in msg, expected
    assert "ok-image" not in msg
    assert msg.endswith("Fix or remove these lines (format: tasks/README.md).")


# ------------------------------------------------------------------ metrics


def test_normalisation_and_exact_match():
    assert normalize_answer("  The Circle. ") == "circle"
    assert normalize_answer("ＡＢＣ, an apple!") == "abc apple"
    assert exact_match("Circle!\nbecause it is round", "circle") == 1.0
    assert exact_match("a square", "circle") == 0.0
    assert exact_match("", "circle") == 0.0
    # An answer that is only an article (a letter answer) keeps it: "" must not match "A".
    assert normalize_answer("A") == "a" and normalize_answer("The.") == "the"
    assert exact_match("", "A") == 0.0 and exact_match("The", "A") == 0.0
    assert exact_match("a", "A") == 1.0 and exact_match("(A)", "A") == 1.0
    assert score_sample("wer", "", "The") == (0.0, 1.0)


def test_answers_that_normalise_to_nothing_are_refused():
    from pydantic import ValidationError

    base = {"id": "x", "task": "t", "modality": "text", "prompt": "?", "root": ".", "line": 1}
    with pytest.raises(ValidationError, match="empty after normalisation"):
        TaskEntry.model_validate({**base, "answer": "?!", "metric": "exact_match"})
    with pytest.raises(ValidationError, match="a choice is empty after normalisation"):
        TaskEntry.model_validate(
            {**base, "answer": "A", "metric": "multiple_choice", "choices": ["A", "..."]}
        )
    ok = TaskEntry.model_validate({**base, "answer": "A", "metric": "exact_match"})
    assert ok.answer == "A"


def test_word_error_rate():
    assert (
        word_error_rate(
            "How many warehouses are in the north region?",
            "how many warehouses are in the North region",
        )
        == 0.0
    )
    assert word_error_rate("one two four", "one two three") == pytest.approx(
        1 / 3
    )  # 1 substitution
    assert word_error_rate("one two three four", "one two three") == pytest.approx(
        1 / 3
    )  # 1 insertion
    assert word_error_rate("", "one two") == 1.0
    assert word_error_rate("x y z w v", "one") == 5.0
    assert score_sample("wer", "x y z w v", "one") == (0.0, 5.0)  # score clipped at 0
    assert score_sample("wer", "one two four", "one two three")[0] == pytest.approx(2 / 3)
    assert score_sample("exact_match", "Blue", "blue") == (1.0, None)


# ------------------------------------------------------------------ fidelity and statistics


def test_span_distribution_full_vocab_kl_and_agreement():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 40, generator=g)
    cand = base + 0.3 * torch.randn(5, 40, generator=g)
    span = SpanDistribution.from_logits(base)
    assert span.indices is None
    kl, agree = span.compare(base.clone())
    assert torch.equal(kl, torch.zeros(5)) and torch.equal(agree, torch.ones(5))  # exactly 0 / 1
    kl, agree = span.compare(cand)
    logp, logq = base.log_softmax(-1).double(), cand.log_softmax(-1).double()
    expected = (logp.exp() * (logp - logq)).sum(-1)
    assert torch.allclose(kl.double(), expected, atol=1e-6)  # float32 vs float64 reference
    assert torch.equal(agree, (base.argmax(-1) == cand.argmax(-1)).float())


def test_span_distribution_topk_is_a_lower_bound_with_exact_agreement():
    g = torch.Generator().manual_seed(1)
    base = 3 * torch.randn(6, 500, generator=g)
    cand = base + torch.randn(6, 500, generator=g)
    full_kl, full_agree = SpanDistribution.from_logits(base).compare(cand)
    top = SpanDistribution.from_logits(base, topk=20)
    assert (
        top.indices.shape == (6, 20) and top.nbytes() < SpanDistribution.from_logits(base).nbytes()
    )
    kl, agree = top.compare(cand)
    assert torch.all(kl <= full_kl + 1e-5)  # coarse-graining never increases KL (float32 slack)
    assert torch.all(kl > 0.3 * full_kl)  # and the top-20 carry most of it here
    assert torch.equal(agree, full_agree)
    kl_same, agree_same = top.compare(base)
    assert torch.allclose(kl_same, torch.zeros(6), atol=1e-6) and torch.equal(
        agree_same, torch.ones(6)
    )


def test_span_distribution_topk_tail_is_exact_when_the_candidate_tail_is_tiny():
    """A confident candidate (tail mass ~1e-10) must not inflate the top-k KL: its tail
    mass cannot be taken as 1 - sum(kept) in float32 (that cancels to <= 0)."""
    vocab, k = 40000, 256
    g = torch.Generator().manual_seed(0)
    base = torch.full((1, vocab), -10.0)
    base[0, :k] = 3.0 + 0.5 * torch.randn(k, generator=g)
    cand = base.clone()
    cand[0, k:] -= 15.0  # baseline tail ~3e-4, candidate tail ~1e-10
    logp, logq = torch.log_softmax(base.double(), -1)[0], torch.log_softmax(cand.double(), -1)[0]
    p_tail, q_tail = logp[k:].exp().sum(), logq[k:].exp().sum()
    assert 1 - torch.log_softmax(cand, -1)[0, :k].exp().sum() <= 0  # the float32 trap
    exact = (logp[:k].exp() * (logp[:k] - logq[:k])).sum() + p_tail * (p_tail / q_tail).log()
    kl, _ = SpanDistribution.from_logits(base, topk=k).compare(cand)
    full, _ = SpanDistribution.from_logits(base, topk=vocab).compare(cand)
    assert float(kl[0]) == pytest.approx(float(exact), rel=2e-2)
    assert float(kl[0]) <= float(full[0]) * 1.02


def test_recovery_and_paired_bootstrap():
    assert recovery(0.45, 0.5) == (pytest.approx(0.9), True)
    assert recovery(0.0, 0.0) == (1.0, False)  # 0/0: nothing to lose, flagged undefined
    assert recovery(0.3, 0.0) == (1.0, False)
    assert paired_bootstrap_ci([1, 0, 1], [1, 0, 1], 500, 0) == (0.0, 0.0)
    base = [1.0] * 20 + [0.0] * 20
    cand = [1.0] * 10 + [0.0] * 30
    ci = paired_bootstrap_ci(base, cand, 2000, (0, 7))
    assert ci == paired_bootstrap_ci(base, cand, 2000, (0, 7))  # seeded
    assert ci[0] < -0.25 < ci[1] < 0  # true delta -0.25, a clear drop
    assert (
        paired_bootstrap_ci([], [], 100, 0) is None and paired_bootstrap_ci([1], [1], 0, 0) is None
    )


# ------------------------------------------------------------------ evaluation on the tiny model


@pytest.fixture(scope="module")
def loaded_and_items(tiny_dir):
    from omniquant.data.processing import OmniProcessor
    from omniquant.evaluate.emulated import load_emulated

    loaded = load_emulated(tiny_dir)
    items = prepare_task_items(
        OmniProcessor.from_pretrained(tiny_dir), validate_task_set("omni-smoke")
    )
    return loaded, items


def test_backbone_continuation_equals_the_whole_omni_forward(loaded_and_items):
    """Teacher forcing on captured backbone inputs gives the omni model's own logits."""
    from dataclasses import replace

    from omniquant.evaluate.runner import _continue, backbone_input

    loaded, items = loaded_and_items
    model = loaded.model
    by_modality = {}
    for item in items:
        by_modality.setdefault(item.entry.modality, item)
    with torch.no_grad():
        for modality, item in by_modality.items():
            for rate in (0.0, 0.5) if modality == "video" else (None,):
                with loaded.adapter.video_pruning(model, rate):
                    sample = item.sample
                    answer = sample.answer_ids
                    prefix = backbone_input(loaded, sample)
                    ours = _continue(
                        model.language_model,
                        model.get_input_embeddings(),
                        prefix,
                        answer,
                        answer.shape[1] + 1,
                    )
                    whole = replace(sample, input_ids=torch.cat([sample.input_ids, answer], dim=1))
                    ref = (
                        loaded.adapter.forward(model, whole)
                        .logits[0, -(answer.shape[1] + 1) :]
                        .float()
                    )
                # Same inputs through the same modules: equal up to float reassociation.
                assert torch.allclose(ours, ref, atol=1e-5, rtol=0), (modality, rate)


def test_evaluate_model_scores_and_self_fidelity(loaded_and_items):
    from omniquant.evaluate.runner import evaluate_model

    loaded, items = loaded_and_items
    base = evaluate_model(loaded, items, keep_spans=True, max_new_tokens=3)
    assert [s.id for s in base.samples] == [it.entry.id for it in items]
    assert set(base.spans) == {it.entry.id for it in items}
    again = evaluate_model(loaded, items, reference=base.spans, max_new_tokens=3)
    for a, b, item in zip(base.samples, again.samples, items):
        assert b.kl == 0.0 and b.top1 == 1.0, b.id  # same model, same inputs: exactly
        assert a.prediction == b.prediction and a.score == b.score
        assert 0.0 <= a.score <= 1.0
        assert a.answer_tokens == item.sample.answer_ids.shape[1] + 1  # answer + EOS
        if item.entry.metric == "multiple_choice":
            assert a.prediction in item.entry.choices
        if item.entry.metric == "wer":
            assert a.wer is not None and a.score == max(0.0, 1.0 - a.wer)
        assert (a.video_tokens is not None) == (item.entry.modality == "video")


def test_evs_sweep_counts_video_tokens_at_the_backbone(loaded_and_items):
    from omniquant.evaluate.evs import evs_sweep

    loaded, items = loaded_and_items
    rows, reference = evs_sweep(loaded, items, (0.5, 0.0, 0.75, 0.25), max_new_tokens=2)
    assert [r["rate"] for r in rows] == [0.0, 0.25, 0.5, 0.75]
    tokens = [r["video_tokens"] for r in rows]
    # omni-smoke has 2 videos of 4 tubelets x 16 tokens; EVS keeps (1 - q) of them (at
    # least one tubelet): 128, 96, 64, 32.
    assert tokens == [128, 96, 64, 32]
    assert all(r["video_placeholders"] == 128 and r["n"] == 2 for r in rows)
    assert rows[0]["kl_mean"] == 0.0 and rows[0]["top1_agreement"] == 1.0
    assert all(r["kl_mean"] > 0 and math.isfinite(r["kl_mean"]) for r in rows[1:])
    assert set(reference) == {"vid-right", "vid-up"}


def test_greedy_reuses_teacher_forced_logits_without_changing_the_answer(tiny_dir):
    """Greedy decoding that starts from teacher-forced rows and then decodes with the
    model's cache gives exactly what a step-by-step greedy loop that re-runs the whole
    sequence every step gives, whether the reference is right or wrong."""
    import torch

    from omniquant.data.synthetic import synthetic_samples
    from omniquant.evaluate.runner import _continue, _greedy, backbone_input
    from omniquant.models import load_model

    loaded = load_model(tiny_dir, dtype="float32")
    backbone, embed = loaded.model.language_model, loaded.model.get_input_embeddings()
    eos = loaded.tokenizer.eos_token_id
    lengths: list[int] = []
    hook = backbone.register_forward_pre_hook(
        lambda _m, _a, kw: lengths.append(kw["inputs_embeds"].shape[1]), with_kwargs=True
    )
    cached_steps = 0
    for sample in synthetic_samples(loaded, 4, seed=3):
        with torch.no_grad():
            prefix = backbone_input(loaded, sample)
            naive: list[int] = []
            while len(naive) < 6:
                tok = int(_continue(backbone, embed, prefix, naive, 1)[-1].argmax())
                if tok == eos:
                    break
                naive.append(tok)
            expected = loaded.tokenizer.decode(naive, skip_special_tokens=True).strip()
            for forced in (naive + [eos], naive[:2] + [7, eos], [5, eos]):
                logits = _continue(backbone, embed, prefix, forced, len(forced) + 1)
                lengths.clear()
                got = _greedy(backbone, embed, prefix, logits, forced, eos, 6, loaded.tokenizer)
                assert got == expected, (sample.id, forced)
                if forced == [5, eos] and naive[:1] != [5]:
                    # Off the reference after the first token (its logits are the forced
                    # row 0): one pass over prompt + that token, then one token a step.
                    assert lengths[0] == prefix.shape[1] + 1 and set(lengths[1:]) <= {1}
                    cached_steps += len(lengths) - 1
    hook.remove()
    assert cached_steps >= 4  # the cached path really decoded several tokens
