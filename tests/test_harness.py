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


@pytest.mark.skipif(not os.environ.get("OMNIQUANT_TEST_LMMS_EVAL"),
                    reason="opt-in: lmms-eval is not in the dev extra (CUDA torchvision)")  # fmt: skip
def test_lmms_eval_knows_the_shipped_demo_task():
    get_harness("lmms-eval").check_tasks(["omni_demo_media"], LM_DEMO.parent / "lmms-eval-demo")


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
