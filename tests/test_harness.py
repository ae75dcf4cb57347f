"""report --harness: the harness registry, pairing and statistics, refusals, and lm-eval end to end."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from omniquant.demo import demo_model_dir
from omniquant.endpoint.harness import (
    HARNESSES,
    HarnessRun,
    HarnessSample,
    HarnessTask,
    check_comparable,
    get_harness,
    require,
)
from omniquant.errors import EndpointError
from omniquant.report.harness import harness_block

LM_DEMO = Path(__file__).resolve().parent.parent / "tasks" / "lm-eval-demo"
LMMS_DEMO = LM_DEMO.parent / "lmms-eval-demo"


def _task(name="t", values=(1, 0, 1, 1), hib=True, version="1.0", shots=0, docs=None, cfg=None):
    docs = list(range(len(values))) if docs is None else docs
    samples = [HarnessSample(doc_id=d, value=float(v), prediction=None, cached=False)
               for d, v in zip(docs, values, strict=True)]  # fmt: skip
    return HarnessTask(name=name, metric="acc" if hib else "wer", higher_is_better=hib,
                       version=version, num_fewshot=shots, config=cfg or {"task": name},
                       samples=samples, log="x.jsonl")  # fmt: skip


def _run(model, *tasks):
    return HarnessRun(harness="lm-eval", model=model, tasks={t.name: t for t in tasks},
                      output_dir=f"/o/{model}", log=f"/o/{model}.log")  # fmt: skip


def test_registry_has_one_entry_per_harness_and_refuses_unknown_names():
    assert sorted(HARNESSES) == ["lm-eval", "lmms-eval"]
    with pytest.raises(EndpointError, match="unknown harness 'helm'; known: lm-eval, lmms-eval"):
        get_harness("helm")


def test_a_missing_harness_names_its_install_command(monkeypatch):
    import importlib.util

    monkeypatch.delenv("OMNIQUANT_LMMS_EVAL_PYTHON", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lmms_eval" else real(name, *a))  # fmt: skip
    with pytest.raises(EndpointError, match=r'pip install "lmms-eval==0\.7\.3" "filelock<4"'):
        require(get_harness("lmms-eval"))


def test_pairing_is_by_doc_id_and_uses_the_report_statistics():
    base = _run("bf16", _task(values=(1, 1, 1, 1)))
    # the candidate's log lists documents in another order: doc 2 is its only miss
    cand = _run("nvfp4", _task(values=(1, 0, 1, 1), docs=[3, 2, 1, 0]))
    block = harness_block([base, cand], ["bf16", "nvfp4"], threshold=0.95, resamples=200, seed=0)
    s = block["models"][1]["tasks"]["t"]
    assert s["value"] == 0.75 and s["baseline_value"] == 1.0 and s["recovery"] == 0.75
    assert s["delta"] == -0.25
    low, high = s["delta_ci95"]
    assert -1.0 <= low <= -0.25 <= high <= 0.0  # every resample's mean is in [-1, 0]
    assert block["models"][1]["tasks_below_threshold"] == ["t"]
    assert "recovery 75%" in block["models"][1]["verdict"]
    assert block["models"][0]["tasks"]["t"]["recovery"] == 1.0


def test_lower_is_better_recovery_is_baseline_over_candidate():
    base = _run("bf16", _task(values=(0.1, 0.1), hib=False))
    cand = _run("fp8", _task(values=(0.2, 0.2), hib=False))
    block = harness_block([base, cand], ["bf16", "fp8"], threshold=0.95, resamples=0, seed=0)
    s = block["models"][1]["tasks"]["t"]
    assert s["recovery"] == pytest.approx(0.5) and s["delta"] == pytest.approx(0.1)
    assert block["tasks"]["t"]["higher_is_better"] is False
    perfect = _run("fp8", _task(values=(0.0, 0.0), hib=False))
    block = harness_block([base, perfect], ["bf16", "fp8"], threshold=0.95, resamples=0, seed=0)
    assert block["models"][1]["tasks"]["t"]["recovery"] == 1.0
    assert block["models"][1]["tasks_below_threshold"] == []


@pytest.mark.parametrize(
    ("other", "why"),
    [
        (_task(version="2.0"), "task version 2.0 vs 1.0"),
        (_task(shots=5), "num_fewshot 5 vs 0"),
        (_task(values=(1, 1, 1)), "3 samples vs 4"),
        (_task(cfg={"task": "t", "doc_to_text": "other"}), "task configuration differs in doc_to_text"),
        (_task(name="u"), "has no results"),
    ],
)
def test_runs_that_are_not_comparable_are_refused(other, why):
    with pytest.raises(EndpointError, match="lm-eval task 't': fp8 is not comparable with bf16: "
                       + why.replace("(", r"\(")):  # fmt: skip
        check_comparable([_run("bf16", _task()), _run("fp8", other)])


def test_lm_eval_refuses_an_unknown_task_by_name_and_knows_the_shipped_ones():
    lm = get_harness("lm-eval")
    lm.check_tasks(["omni_demo_next_number", "omni_demo_next_number_mc"], LM_DEMO)
    with pytest.raises(EndpointError, match=r"lm-eval does not know task\(s\) 'omni_demo_next_numbr' "
                       r"\(close: omni_demo_next_number"):  # fmt: skip
        lm.check_tasks(["omni_demo_next_numbr"], LM_DEMO)


def _fake_output(root: Path, cached_doc: int) -> Path:
    """An lm-eval output folder as 0.4.13 writes it (two documents of the MC task)."""
    from lm_eval.api.model import hash_args

    d = root / "samples" / "m"
    d.mkdir(parents=True)
    stamp = "2026-01-01T00-00-00.000000"
    cfg = {"task": "mc", "num_fewshot": 0, "metric_list": [{"metric": "acc"}],
           "metadata": {"version": 1.0}}  # fmt: skip
    (d / f"results_{stamp}.json").write_text(json.dumps({
        "configs": {"mc": cfg}, "versions": {"mc": 1.0}, "n-shot": {"mc": 0},
        "higher_is_better": {"mc": {"acc": True}},
    }))  # fmt: skip
    lines, keys = [], []
    for doc in (0, 1):
        args = {"gen_args_0": {"arg_0": f"q{doc}", "arg_1": " a"},
                "gen_args_1": {"arg_0": f"q{doc}", "arg_1": " b"}}  # fmt: skip
        lines.append(json.dumps({"doc_id": doc, "arguments": args, "filtered_resps": [],
                                 "metrics": ["acc"], "acc": float(doc)}))  # fmt: skip
        if doc == cached_doc:
            keys += [hash_args("loglikelihood", [g["arg_0"], g["arg_1"]]) for g in args.values()]
    (d / f"samples_mc_{stamp}.jsonl").write_text("\n".join(lines) + "\n")
    return root / "samples", set(keys)


def test_read_output_pairs_metadata_and_marks_samples_from_the_cache(tmp_path):
    from omniquant.endpoint.harness.lm_eval import cache_keys, read_output

    out, keys = _fake_output(tmp_path, cached_doc=1)
    db = tmp_path / "c_rank0.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE unnamed (key TEXT PRIMARY KEY, value BLOB)")
        conn.executemany("INSERT INTO unnamed VALUES (?, ?)", [(k, b"") for k in keys])
    assert cache_keys(db) == keys and cache_keys(tmp_path / "none.db") == set()
    task = read_output(out, "m", ["mc"], cache_keys(db), tmp_path / "log")["mc"]
    assert (task.metric, task.version, task.num_fewshot) == ("acc", "1.0", 0)
    assert [(s.doc_id, s.value, s.cached) for s in task.samples] == [(0, 0.0, False), (1, 1.0, True)]
    with pytest.raises(EndpointError, match="lm-eval task 'gen' of m: no per-sample log in"):
        read_output(out, "m", ["gen"], None, tmp_path / "log")


def test_a_failing_lm_eval_run_names_model_tasks_and_log_and_leaves_failed_json(tmp_path, monkeypatch):
    from omniquant.endpoint.protocol import parse_model_source
    from omniquant.experiments.harness import run_harness

    monkeypatch.chdir(tmp_path)  # a relative OUT: the child runs elsewhere, paths stay right
    source = parse_model_source("fp8=http://127.0.0.1:9/v1#fp8")
    with pytest.raises(EndpointError) as err:
        run_harness("lm-eval", ["omni_demo_next_number"], [source], ["fp8"], Path("h"),
                    include=LM_DEMO, harness_args="--no-such-flag")  # fmt: skip
    text = str(err.value)
    assert "lm-eval failed on model 'fp8', tasks omni_demo_next_number (exit code 2)" in text
    assert str(tmp_path / "h" / "fp8" / "lm-eval.log") in text
    record = json.loads((tmp_path / "h" / "failed.json").read_text())
    assert record["model"] == "fp8" and record["tasks"] == ["omni_demo_next_number"]
    assert record["logs"] == str(Path("h") / "fp8")


def test_report_refuses_an_unknown_harness_task_before_any_model_work(tmp_path):
    from omniquant.cli import main

    out = tmp_path / "r"
    code = main(["report", "--baseline", str(demo_model_dir()), "--candidate",
                 str(demo_model_dir()), "--tasks", "omni-smoke", "--out", str(out),
                 "--harness", "lm-eval", "--harness-tasks", "omni_demo_nope"])  # fmt: skip
    assert code != 0
    assert not (out / "report.json").exists()


# ---------------------------------------------------------------------------- end to end


def _text_task_set(root: Path, n: int) -> Path:
    """The first ``n`` documents of the shipped lm-eval demo data as an omni task set."""
    rows = [json.loads(line) for line in (LM_DEMO / "next_number.jsonl").read_text().splitlines()]
    lines = []
    for r in rows[:n]:
        lines.append({"id": r["id"] + "-gen", "task": "omni_demo_next_number", "modality": "text",
                      "prompt": r["prompt"], "answer": r["answer"], "metric": "exact_match"})  # fmt: skip
        # lm-eval's continuation is " N" (target_delimiter " "): the same tokens here
        lines.append({"id": r["id"] + "-mc", "task": "omni_demo_next_number_mc",
                      "modality": "text", "prompt": r["prompt"], "answer": " " + r["answer"],
                      "choices": [" " + c for c in r["choices"]],
                      "metric": "multiple_choice"})  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    (root / "tasks.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


@pytest.fixture(scope="module")
def demo_three(tmp_path_factory):
    from omniquant.demo import DEMO_CALIB
    from omniquant.quantize.pipeline import quantize

    root = tmp_path_factory.mktemp("harness_exports")
    out = {"bf16": demo_model_dir()}
    for name, recipe in (("fp8", "fp8_omni"), ("nvfp4", "nvfp4_omni")):
        out[name] = quantize(demo_model_dir(), recipe, root / name, calib=DEMO_CALIB, quiet=True).out
    return out


@pytest.mark.slow
def test_report_harness_lm_eval_matches_the_in_process_accuracy(demo_three, tmp_path):
    """On BF16, FP8 and NVFP4 served by ``omniquant serve`` (started by the report), lm-eval's
    per-task accuracy on the shipped demo tasks equals the in-process report's on the same
    documents; a second report over the same harness cache answers every sample from it."""
    from omniquant.cli import main

    n = int(os.environ.get("OMNIQUANT_HARNESS_DOCS", "6"))
    tasks = _text_task_set(tmp_path / "set", n)
    args = ["report", "--baseline", f"bf16={demo_three['bf16']}",
            "--candidate", f"fp8={demo_three['fp8']}", "--candidate", f"nvfp4={demo_three['nvfp4']}",
            "--tasks", str(tasks), "--out", str(tmp_path / "r"), "--harness", "lm-eval",
            "--harness-tasks", "omni_demo_next_number,omni_demo_next_number_mc",
            "--harness-args", f"--limit {n}"]  # fmt: skip
    assert main(args) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    block = report["harness"]
    assert [m["name"] for m in block["models"]] == ["bf16", "fp8", "nvfp4"]
    for model, hm in zip([report["baseline"], *report["candidates"]], block["models"], strict=True):
        for task in ("omni_demo_next_number", "omni_demo_next_number_mc"):
            assert hm["tasks"][task]["n"] == n
            assert hm["tasks"][task]["value"] == pytest.approx(model["tasks"][task]["accuracy"]), (
                model["name"], task)
            assert hm["tasks"][task]["cached_samples"] == 0
    assert "lm-eval tasks" in (tmp_path / "r" / "report.md").read_text()
    assert "lm-eval tasks" in (tmp_path / "r" / "report.html").read_text()


LMMS_PYTHON = os.environ.get("OMNIQUANT_LMMS_EVAL_PYTHON")
needs_lmms = pytest.mark.skipif(
    not LMMS_PYTHON,
    reason="opt-in: set OMNIQUANT_LMMS_EVAL_PYTHON to the python of a separate lmms-eval venv "
    "(README, Standard benchmarks: lmms-eval 0.7.3 needs a torchvision the CPU torch cannot load)",
)


@needs_lmms
def test_lmms_eval_knows_the_shipped_demo_task():
    lmms = get_harness("lmms-eval")
    lmms.check_tasks(["omni_demo_media"], LMMS_DEMO)
    with pytest.raises(EndpointError, match=r"lmms-eval does not know task\(s\) 'omni_demo_medi' "
                       r"\(close: omni_demo_media\)"):  # fmt: skip
        lmms.check_tasks(["omni_demo_medi"], LMMS_DEMO)


def _media_task_set(root: Path, n: int) -> Path:
    """The first ``n`` documents of the lmms-eval demo task as an omni task set scored by
    generation (exact_match), media copied in, prompts as tasks/omni-demo writes them."""
    import shutil

    demo = LM_DEMO.parent / "omni-demo"
    by_id = {json.loads(x)["id"]: json.loads(x) for x in (demo / "tasks.jsonl").read_text().splitlines()}
    docs = [json.loads(x) for x in (LMMS_DEMO / "omni_demo_media.jsonl").read_text().splitlines()]
    lines = []
    for d in docs[:n]:
        entry = dict(by_id[d["id"]], task="omni_demo_media", metric="exact_match")
        entry.pop("choices", None)
        media = entry[d["modality"]]
        for rel in media if isinstance(media, list) else [media]:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(demo / rel, root / rel)
        lines.append(entry)
    (root / "tasks.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


@needs_lmms
@pytest.mark.slow
def test_report_harness_lmms_eval_matches_the_in_process_accuracy(demo_three, tmp_path):
    """The shipped image/video/audio lmms-eval task, run by lmms-eval in its own venv against
    BF16, FP8 and NVFP4 served by ``omniquant serve`` (started by the report), gives the
    in-process report's generation accuracy on the same documents, per model."""
    from omniquant.cli import main

    n = int(os.environ.get("OMNIQUANT_HARNESS_DOCS", "12"))
    tasks = _media_task_set(tmp_path / "set", n)
    args = ["report", "--baseline", f"bf16={demo_three['bf16']}",
            "--candidate", f"fp8={demo_three['fp8']}", "--candidate", f"nvfp4={demo_three['nvfp4']}",
            "--tasks", str(tasks), "--out", str(tmp_path / "r"), "--harness", "lmms-eval",
            "--harness-tasks", "omni_demo_media", "--harness-python", LMMS_PYTHON,
            "--harness-args", f"--limit {n}"]  # fmt: skip
    assert main(args) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    block = report["harness"]
    assert block["harness"] == "lmms-eval"
    for model, hm in zip([report["baseline"], *report["candidates"]], block["models"], strict=True):
        got = hm["tasks"]["omni_demo_media"]
        assert got["n"] == n
        assert got["value"] == pytest.approx(model["tasks"]["omni_demo_media"]["accuracy"]), model["name"]
        assert got["harness_reported"] == pytest.approx(got["value"])


@pytest.mark.slow
def test_a_second_lm_eval_run_answers_from_its_cache_and_says_so(tmp_path):
    """Resume: the same run again reads every request from lm-eval's sqlite cache, and the
    per-sample records say the samples came from it."""
    from omniquant.endpoint.launch import launched_server

    lm = get_harness("lm-eval")
    kw = {"model_id": "demo", "tokenizer": str(demo_model_dir()), "include": LM_DEMO,
          "tasks": ["omni_demo_next_number"], "out": tmp_path / "demo",
          "extra_args": ["--limit", "2"]}  # fmt: skip
    with launched_server(demo_model_dir(), "demo", tmp_path / "serve.log") as url:
        first = lm.run(url=url, **kw).tasks["omni_demo_next_number"]
        second = lm.run(url=url, **kw).tasks["omni_demo_next_number"]
    assert [s.cached for s in first.samples] == [False, False]
    assert [s.cached for s in second.samples] == [True, True]
    assert [s.value for s in second.samples] == [s.value for s in first.samples]


# ---------------------------------------------------------------------------- the harness's own interpreter


def test_a_missing_or_broken_harness_interpreter_names_the_flag_and_the_install(monkeypatch, tmp_path):
    import sys

    lmms = get_harness("lmms-eval")
    monkeypatch.delenv("OMNIQUANT_LMMS_EVAL_PYTHON", raising=False)
    with pytest.raises(EndpointError) as err:
        require(lmms, str(tmp_path / "no-python"))
    text = str(err.value)
    assert "--harness-python" in text and "cannot import lmms_eval" in text
    assert 'pip install "lmms-eval==0.7.3" "filelock<4"' in text
    assert err.value.arg == "harness_python"
    # this venv's python has no lmms_eval: named as the environment variable's
    monkeypatch.setenv("OMNIQUANT_LMMS_EVAL_PYTHON", sys.executable)
    with pytest.raises(EndpointError, match=r"from OMNIQUANT_LMMS_EVAL_PYTHON\) cannot import "
                       r"lmms_eval: ModuleNotFoundError"):  # fmt: skip
        require(lmms)


def test_task_names_are_asked_from_the_harness_interpreter(monkeypatch):
    """With an interpreter given, the task list comes from a child process (here this venv's
    own python, which has lm-eval) and unknown names are refused with close matches."""
    import sys

    from omniquant.endpoint.harness import known_tasks

    lm = get_harness("lm-eval")
    known = known_tasks(lm, LM_DEMO, sys.executable)
    assert {"omni_demo_next_number", "omni_demo_next_number_mc"} <= set(known)
    with pytest.raises(EndpointError, match=r"lm-eval does not know task\(s\) 'omni_demo_next_numbr' "
                       r"\(close: omni_demo_next_number"):  # fmt: skip
        lm.check_tasks(["omni_demo_next_numbr"], LM_DEMO, sys.executable)


def test_lmms_eval_model_args_are_merged_after_the_entrys_own():
    from omniquant.endpoint.harness.lmms_eval import _model_args

    rest, theirs = _model_args(["--limit", "4", "--model_args", "max_frames_num=8,pass_video_url=False"])
    assert rest == ["--limit", "4"] and theirs == ["max_frames_num=8", "pass_video_url=False"]
    assert _model_args(["--model_args=a=1"]) == ([], ["a=1"])


def _lmms_output(root: Path, task: str, rows: list[dict], hib: dict, cfg: dict | None = None,
                 reported: dict | None = None) -> Path:  # fmt: skip
    """An output folder as lmms-eval 0.7.3 writes it: ``<stamp>_results.json`` and
    ``<stamp>_samples_<task>.jsonl`` under the sanitised model name; task functions are
    recorded as their repr, with a memory address."""
    d = root / "samples" / "m"
    d.mkdir(parents=True)
    stamp = "20261206_232253"
    cfg = cfg or {"task": task, "num_fewshot": 0, "doc_to_text": "<function doc_to_text at 0x7fdf4c0fa7a0>",
                  "metric_list": [{"metric": next(iter(hib))}], "metadata": [{"version": 0.0}]}  # fmt: skip
    (d / f"{stamp}_results.json").write_text(json.dumps({
        "results": {task: reported or {}}, "configs": {task: cfg}, "versions": {task: 0.0},
        "n-shot": {task: 0}, "higher_is_better": {task: hib},
    }))  # fmt: skip
    (d / f"{stamp}_samples_{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "samples"


def test_read_output_reads_lmms_eval_files_and_ignores_function_addresses(tmp_path):
    from omniquant.endpoint.harness.lm_eval import read_output

    rows = [{"doc_id": i, "target": "red", "filtered_resps": "red", "exact_match": 1.0 * (i != 1),
             "input": "q\n"} for i in range(3)]  # fmt: skip
    out = _lmms_output(tmp_path / "a", "media", rows, {"exact_match": True},
                       reported={"exact_match,none": 2 / 3, "exact_match_stderr,none": 0.3})  # fmt: skip
    task = read_output(out, "m", ["media"], None, tmp_path / "log", harness="lmms-eval")["media"]
    assert [(s.doc_id, s.value, s.cached) for s in task.samples] == [(0, 1.0, None), (1, 0.0, None), (2, 1.0, None)]
    assert (task.metric, task.version, task.reported, task.corpus) == ("exact_match", "0.0", pytest.approx(2 / 3), False)
    assert task.config["doc_to_text"] == "<function doc_to_text>"
    # a request that failed after lmms-eval's retries is logged as text; the run is refused
    rows[2]["filtered_resps"] = "[LMMS_EVAL_REQUEST_FAILED after 5 retries] Connection error."
    out = _lmms_output(tmp_path / "b", "media", rows, {"exact_match": True})
    with pytest.raises(EndpointError, match=r"the request of sample 2 failed .*LMMS_EVAL_REQUEST_FAILED"):
        read_output(out, "m", ["media"], None, tmp_path / "log", harness="lmms-eval")


def _asr_rows(preds: list[str], refs: list[str]) -> list[dict]:
    """Per-sample rows as lmms-eval's librispeech task logs them: the metric is a record."""
    return [{"doc_id": i, "filtered_resps": p, "target": r,
             "wer": {"gt": r, "pred": p, "source": "test_clean", "task": "asr_en"}}
            for i, (p, r) in enumerate(zip(preds, refs, strict=True))]  # fmt: skip


def test_corpus_wer_is_paired_per_document_and_lower_is_better(tmp_path):
    """Per-document (errors, reference words) from lmms-eval's {gt, pred} records; the
    report's value is the corpus ratio, recovery is baseline over candidate, and the
    interval is a paired bootstrap over documents recomputing both corpus WERs."""
    import numpy as np

    from omniquant.endpoint.harness.lm_eval import read_output
    from omniquant.report.stats import paired_bootstrap_ratio_ci

    refs = ["the cat sat on the mat", "hello world", "a b c d e f g h i j", "good morning"]
    base_p = ["the cat sat on the mat", "hello world", "a b c d e f g h i x", "good morning"]
    cand_p = ["the cat sat on mat", "Hello, world!", "a b c d e f g x x x", "good evening"]
    runs = []
    for name, preds in (("bf16", base_p), ("nvfp4", cand_p)):
        out = _lmms_output(tmp_path / name, "librispeech_test_clean", _asr_rows(preds, refs),
                           {"wer": False}, reported={"wer,none": 0.0})  # fmt: skip
        found = read_output(out, name, ["librispeech_test_clean"], None, tmp_path / "log",
                            harness="lmms-eval")  # fmt: skip
        runs.append(HarnessRun(harness="lmms-eval", model=name, tasks=found, output_dir=str(out), log="l"))
    task = runs[1].tasks["librispeech_test_clean"]
    assert task.corpus and not task.higher_is_better
    # case and punctuation do not count: "Hello, world!" is right
    assert [s.counts for s in task.samples] == [(1.0, 6.0), (0.0, 2.0), (3.0, 10.0), (1.0, 2.0)]
    block = harness_block(runs, ["bf16", "nvfp4"], threshold=0.9, resamples=400, seed=0)
    got = block["models"][1]["tasks"]["librispeech_test_clean"]
    assert got["baseline_value"] == pytest.approx(1 / 20) and got["value"] == pytest.approx(5 / 20)
    assert got["recovery"] == pytest.approx(0.2) and got["delta"] == pytest.approx(0.2)
    assert got["corpus"] and got["harness_reported"] == 0.0
    low, high = got["delta_ci95"]
    assert low <= got["delta"] <= high and low >= 0  # every document got no better
    assert block["models"][1]["tasks_below_threshold"] == ["librispeech_test_clean"]
    from omniquant.report.harness import markdown_lines

    md = "\n".join(markdown_lines(block))
    assert "wer ↓ (corpus)" in md and "the harness's own aggregate: bf16 0.0, nvfp4 0.0" in md
    # the interval is the corpus ratio recomputed per resample, not a mean of per-document WERs
    b = [s.counts for s in runs[0].tasks["librispeech_test_clean"].samples]
    c = [s.counts for s in task.samples]
    rng = np.random.default_rng(7)
    idx = rng.integers(0, 4, size=(300, 4))
    deltas = [sum(c[i][0] for i in r) / sum(c[i][1] for i in r)
              - sum(b[i][0] for i in r) / sum(b[i][1] for i in r) for r in idx]  # fmt: skip
    assert paired_bootstrap_ratio_ci(b, c, 300, 7) == pytest.approx(tuple(np.percentile(deltas, [2.5, 97.5])))


def test_a_metric_record_of_another_shape_is_refused_by_name_and_mmau_s_is_paired(tmp_path):
    from omniquant.endpoint.harness.lm_eval import read_output

    # lmms-eval's MMAU logs {"overall": 0/1, "task": ...} per document (aggregate: mean x 100)
    rows = [{"doc_id": i, "filtered_resps": "A", "accuracy": {"overall": float(i % 2), "task": "sound"}}
            for i in range(4)]  # fmt: skip
    out = _lmms_output(tmp_path / "mmau", "mmau_test_mini", rows, {"accuracy": True})
    task = read_output(out, "m", ["mmau_test_mini"], None, tmp_path / "log", harness="lmms-eval")
    assert [s.value for s in task["mmau_test_mini"].samples] == [0.0, 1.0, 0.0, 1.0]
    assert not task["mmau_test_mini"].corpus

    rows = [{"doc_id": 0, "filtered_resps": "B", "accuracy": {"pred": "B", "answer": "A", "task": "x"}}]
    out = _lmms_output(tmp_path / "other", "mmau_test_mini", rows, {"accuracy": True})
    with pytest.raises(EndpointError, match=r"has 'accuracy' as a record of fields \['answer', 'pred', 'task'\]"):
        read_output(out, "m", ["mmau_test_mini"], None, tmp_path / "log", harness="lmms-eval")


def test_a_relative_harness_interpreter_is_made_absolute_not_resolved(monkeypatch, tmp_path):
    """The harness runs in the task folder: a relative interpreter path is made absolute
    (a venv's python is a symlink: resolving it would leave the venv)."""
    from omniquant.endpoint.harness import interpreter

    monkeypatch.chdir(tmp_path)
    lmms = get_harness("lmms-eval")
    monkeypatch.delenv("OMNIQUANT_LMMS_EVAL_PYTHON", raising=False)
    assert interpreter(lmms, ".venv-lmms/bin/python") == str(tmp_path / ".venv-lmms" / "bin" / "python")
    assert interpreter(lmms, "python3") == "python3" and interpreter(lmms) is None
    monkeypatch.setenv("OMNIQUANT_LMMS_EVAL_PYTHON", "v/bin/python")
    assert interpreter(lmms) == str(tmp_path / "v" / "bin" / "python")


def test_an_lmms_eval_run_that_exits_0_without_results_names_its_error(tmp_path, monkeypatch):
    """lmms-eval 0.7.3 catches its own errors and exits 0 (with filelock 4: "No module named
    'filelock._api'"): the run is refused with the log's error line, not read as empty."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho \"| ERROR | lmms_eval.__main__:cli_evaluate:614 - Error during "
                    "evaluation: No module named 'filelock._api'.\"\nexit 0\n")  # fmt: skip
    fake.chmod(0o755)
    monkeypatch.delenv("OMNIQUANT_LMMS_EVAL_PYTHON", raising=False)
    with pytest.raises(EndpointError) as err:
        get_harness("lmms-eval").run(url="http://127.0.0.1:9/v1", model_id="m", tokenizer=None,
                                     tasks=["omni_demo_media"], include=LMMS_DEMO, out=tmp_path / "o",
                                     extra_args=[], python=str(fake))  # fmt: skip
    text = str(err.value)
    assert "lmms-eval wrote no results under" in text and "filelock._api" in text
    assert str(tmp_path / "o" / "lmms-eval.log") in text


_ASR_YAML = """task: omni_demo_asr
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_messages: !function utils.doc_to_messages
doc_to_target: gt
generation_kwargs:
  max_new_tokens: 16
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: wer
    aggregation: !function utils.wer
    higher_is_better: false
metadata:
  version: 0.0
"""

_ASR_UTILS = '''from pathlib import Path

from lmms_eval.tasks.librispeech.utils import librispeech_wer as wer  # lmms-eval's own corpus WER


def doc_to_visual(doc):
    return [doc["media"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"] + "\\n"


def doc_to_messages(doc, lmms_eval_specific_kwargs=None):
    media = {"type": "audio", "url": Path(doc["media"]).as_uri()}
    return [{"role": "user", "content": [{"type": "text", "text": doc_to_text(doc)}, media]}]


def process_results(doc, results):
    # the record lmms-eval's librispeech task logs per document
    return {"wer": {"gt": doc["gt"], "pred": results[0], "source": "demo", "task": "asr_en"}}
'''


@needs_lmms
@pytest.mark.slow
def test_report_pairs_a_corpus_wer_that_lmms_eval_aggregates_itself(demo_three, tmp_path):
    """The demo's 48 audio documents as an ASR-shaped lmms-eval task whose corpus WER is
    lmms-eval's own librispeech aggregation (needs editdistance and more_itertools in the
    lmms-eval venv): the report's paired corpus WER equals lmms-eval's number (which it
    writes x 100) for every model, and is handled as lower-is-better."""
    import shutil

    from omniquant.cli import main

    inc = tmp_path / "inc"
    (inc / "audio").mkdir(parents=True)
    rows = []
    for line in (LMMS_DEMO / "omni_demo_media.jsonl").read_text().splitlines():
        d = json.loads(line)
        if d["modality"] == "audio":
            dst = inc / "audio" / Path(d["media"]).name
            shutil.copy((LMMS_DEMO / d["media"]).resolve(), dst)
            # references of 1 to 4 words (and punctuation), so the corpus ratio is not a
            # mean of per-document rates and nothing is zero by construction
            gt = [d["answer"], f"it is {d['answer']}", f"{d['answer']}, I think."][len(rows) % 3]
            rows.append({"question": d["question"], "media": str(dst), "gt": gt})
    (inc / "asr.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (inc / "omni_demo_asr.yaml").write_text(_ASR_YAML.format(data=inc / "asr.jsonl"))
    (inc / "utils.py").write_text(_ASR_UTILS)
    tasks = _media_task_set(tmp_path / "set", 4)
    args = ["report", "--baseline", f"bf16={demo_three['bf16']}",
            "--candidate", f"fp8={demo_three['fp8']}", "--candidate", f"nvfp4={demo_three['nvfp4']}",
            "--tasks", str(tasks), "--out", str(tmp_path / "r"), "--harness", "lmms-eval",
            "--harness-tasks", "omni_demo_asr", "--harness-python", LMMS_PYTHON,
            "--harness-include", str(inc)]  # fmt: skip
    assert main(args) == 0
    block = json.loads((tmp_path / "r" / "report.json").read_text())["harness"]
    assert block["tasks"]["omni_demo_asr"]["corpus"] is True
    assert block["tasks"]["omni_demo_asr"]["higher_is_better"] is False
    for m in block["models"]:
        got = m["tasks"]["omni_demo_asr"]
        assert got["n"] == len(rows)
        assert got["value"] > 0.3
        assert got["value"] == pytest.approx(got["harness_reported"] / 100), m["name"]
    assert "wer ↓ (corpus)" in (tmp_path / "r" / "report.md").read_text()


# ---------------------------------------------------------------------------- lmms-eval's response cache


def _lmms_cache(root: Path, rows: list[tuple[str, str, int]], audit: list[dict] = ()) -> None:
    """A response cache as lmms-eval 0.7.3 lays it out: ``cache.db`` and a run's store."""
    run = root / "runs" / "omniquant"
    run.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(root / "cache.db")
    con.execute("CREATE TABLE responses (cache_key TEXT PRIMARY KEY, request_type TEXT, "
                "task_name TEXT, doc_id INTEGER, idx INTEGER, gen_kwargs TEXT, response TEXT, "
                "created_at REAL)")  # fmt: skip
    con.executemany("INSERT INTO responses VALUES (?, 'generate_until', ?, ?, 0, '{}', '\"x\"', 0)", rows)
    con.commit()
    con.close()
    (run / "rank_0.audit.jsonl").write_text("".join(json.dumps(r) + "\n" for r in audit) + '{"cut')


def test_lmms_eval_cache_attribution_counts_a_document_cached_only_when_no_request_was_sent(tmp_path):
    from omniquant.endpoint.harness.lmms_eval import cache_rows, mark_cached
    from omniquant.evaluate.harness_results import HarnessSample, HarnessTask

    root = tmp_path / "cache"
    assert cache_rows(root) == {}
    _lmms_cache(root, [("k0", "t", 0), ("k1", "t", 1)],
                [{"cache_key": "k2", "task_name": "t", "doc_id": 2, "deterministic": True},
                 {"cache_key": "", "task_name": "t", "doc_id": 3, "deterministic": False}])  # fmt: skip
    before = cache_rows(root)  # the write-ahead log's deterministic row counts, a cut line does not
    assert before == {"k0": ("t", 0), "k1": ("t", 1), "k2": ("t", 2)}
    after = {**before, "k1b": ("t", 1), "k4": ("t", 4)}  # doc 1 asked again, doc 4 new
    samples = [HarnessSample(doc_id=d, value=1.0, prediction=None) for d in range(5)]
    found = {"t": HarnessTask(name="t", metric="m", higher_is_better=True, version="1",
                              num_fewshot=0, config={}, samples=samples, log="x")}  # fmt: skip
    mark_cached(found, before, after)
    assert [s.cached for s in samples] == [True, False, True, False, False]


@needs_lmms
@pytest.mark.slow
def test_an_lmms_eval_run_over_more_documents_answers_the_first_from_its_cache(tmp_path):
    """Resume: a run over 3 documents, then over 6: the second sends only the 3 new ones,
    and the per-sample records say which came from lmms-eval's response cache. (lmms-eval
    writes its cache after each request type's whole batch, so a run killed inside that
    batch sends it again: README, Standard benchmarks.)"""
    from omniquant.endpoint.launch import launched_server

    lmms = get_harness("lmms-eval")
    kw = {"model_id": "demo", "tokenizer": None, "include": LMMS_DEMO, "out": tmp_path / "demo",
          "tasks": ["omni_demo_media"], "python": LMMS_PYTHON}  # fmt: skip
    with launched_server(demo_model_dir(), "demo", tmp_path / "serve.log",
                         serve_args=["--allowed-local-media-path", str(LMMS_DEMO.parent)]) as url:  # fmt: skip
        first = lmms.run(url=url, extra_args=["--limit", "3"], **kw).tasks["omni_demo_media"]
        more = lmms.run(url=url, extra_args=["--limit", "6"], **kw).tasks["omni_demo_media"]
    assert [s.cached for s in first.samples] == [False] * 3
    assert [s.cached for s in more.samples] == [True] * 3 + [False] * 3
    assert [s.value for s in more.samples[:3]] == [s.value for s in first.samples]
