"""lm-evaluation-harness 0.4.13, unmodified, against ``omniquant serve`` on the demo's FP8 export.

Two local tasks (``tests/lm_eval_tasks``; each jsonl is also an omniquant task set, so
the in-process evaluator scores the very same samples):
- ``omniquant_numbers_mc`` with ``local-completions``: loglikelihood multiple choice.
  lm-eval tokenizes with the checkpoint's HF tokenizer and sends token ids with
  ``echo``, ``logprobs: 1``, ``max_tokens: 1``; its accuracy must equal the evaluator's.
  Every choice is one token after its prompt (checked below), so lm-eval's summed
  log-likelihood and the evaluator's mean per token pick the same choice.
- ``omniquant_numbers_gen`` with ``local-chat-completions``: ``generate_until`` with
  ``until``, which lm-eval leaves to the server (it does not trim chat answers); its
  exact match must equal the evaluator's, and with ``until=["1"]`` it must equal the
  evaluator's answers cut at the first "1" (a server ignoring ``stop`` scores higher).
lm-eval runs in this process (HF datasets offline, reading the local jsonl).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from serve_helpers import serving

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        importlib.util.find_spec("lm_eval") is None,
        reason="lm-eval[api]==0.4.13 is a dev dependency",
    ),
]
ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "lm_eval_tasks"
MAX_NEW_TOKENS = 4  # the gen task's max_gen_toks


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    from omniquant.demo import DEMO_CALIB, demo_model_dir
    from omniquant.quantize.pipeline import quantize

    out = tmp_path_factory.mktemp("fp8")
    return quantize(demo_model_dir(), "fp8_omni", out / "fp8", calib=DEMO_CALIB, quiet=True).out


def _in_process(path: Path, task: str) -> list:
    """The evaluator's per-sample results on one of the local task sets."""
    from omniquant.data.processing import OmniProcessor
    from omniquant.evaluate import validate_task_set
    from omniquant.evaluate.emulated import load_emulated
    from omniquant.evaluate.runner import evaluate_model
    from omniquant.evaluate.tasks import prepare_task_items

    items = prepare_task_items(OmniProcessor.from_pretrained(path), validate_task_set(TASKS / task))
    loaded = load_emulated(path)
    return evaluate_model(loaded, items, max_new_tokens=MAX_NEW_TOKENS).samples


def _lm_eval(monkeypatch, tmp_path, model: str, model_args: dict, task: str, **kw) -> dict:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ROOT)  # the task YAMLs name their jsonl relative to the repository
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, model_args=model_args, tasks=[task],
                          task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
                          log_samples=True, **kw)  # fmt: skip
    return out


def test_loglikelihood_multiple_choice_equals_the_in_process_scores(fp8, monkeypatch, tmp_path):
    from omniquant.evaluate import validate_task_set

    samples = _in_process(fp8, "numbers_mc")
    entries = validate_task_set(TASKS / "numbers_mc")
    with serving(path=fp8) as (url, _app, model):
        for e in entries:  # the precondition in the module docstring
            for choice in e.choices:
                whole = model.encode(e.prompt + choice, add_special_tokens=True)
                assert whole == model.encode(e.prompt, True) + model.encode(choice), choice
                assert len(model.encode(choice)) == 1
        out = _lm_eval(monkeypatch, tmp_path, "local-completions",
                       {"model": "demo", "base_url": f"{url}/completions",
                        "tokenizer_backend": "huggingface", "tokenizer": str(fp8),
                        "num_concurrent": 1, "max_retries": 1}, "omniquant_numbers_mc")  # fmt: skip
    acc = out["results"]["omniquant_numbers_mc"]["acc,none"]
    want = sum(s.score for s in samples) / len(samples)
    assert acc == pytest.approx(want) and 0 < want
    print(f"lm-eval local-completions acc {acc:.4f} = in-process {want:.4f} ({len(samples)} samples)")
    logged = out["samples"]["omniquant_numbers_mc"]
    by_id = {s.id: s for s in samples}
    for row in logged:  # per sample: the same choice
        chosen = max(range(len(row["filtered_resps"])), key=lambda i: row["filtered_resps"][i][0])
        assert row["doc"]["choices"][chosen] == by_id[row["doc"]["id"]].prediction


def test_generate_until_equals_the_in_process_scores(fp8, monkeypatch, tmp_path):
    from omniquant.evaluate import validate_task_set

    samples = _in_process(fp8, "numbers_gen")
    answers = {e.id: e.answer for e in validate_task_set(TASKS / "numbers_gen")}
    want = sum(s.score for s in samples) / len(samples)
    # The evaluator's greedy answers cut at the first "1", as a server honouring stop cuts them.
    cut = sum(s.prediction.split("1")[0].strip() == answers[s.id] for s in samples) / len(samples)
    with serving(path=fp8) as (url, _app, _model):
        args = {"model": "demo", "base_url": f"{url}/chat/completions", "num_concurrent": 1,
                "max_retries": 1}  # fmt: skip
        out = _lm_eval(monkeypatch, tmp_path, "local-chat-completions", args,
                       "omniquant_numbers_gen", apply_chat_template=True)  # fmt: skip
        stopped = _lm_eval(monkeypatch, tmp_path, "local-chat-completions", args,
                           "omniquant_numbers_gen", apply_chat_template=True,
                           gen_kwargs={"until": ["1"]})  # fmt: skip
    em = out["results"]["omniquant_numbers_gen"]["exact_match,none"]
    assert em == pytest.approx(want)
    assert 0 < want
    got = stopped["results"]["omniquant_numbers_gen"]["exact_match,none"]
    assert got == pytest.approx(cut) and cut < want, (got, cut, want)  # the server cut at "1"
    print(f"lm-eval generate_until exact_match {em:.4f} (in-process {want:.4f}); "
          f"until=['1']: {got:.4f}")
