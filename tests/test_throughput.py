"""The report's load phase: timed requests, streaming or not, all-or-nothing levels, the
workload file, the capacity arithmetic, the cost tables and chart, and (slow) the demo
model's BF16 / FP8 / NVFP4 exports served by ``omniquant serve`` started by the report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from omniquant.demo import DEMO_TASKS, demo_model_dir
from omniquant.endpoint.client import EndpointClient
from omniquant.endpoint.load import (
    LoadRequest,
    Workload,
    read_workload_file,
    run_load,
    summarize_level,
)
from omniquant.endpoint.protocol import parse_model_source
from omniquant.errors import DataError, ReportError

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"data": [{"id": "m", "root": "/x", "owned_by": "vllm"}]}


def _workload(**kw) -> Workload:
    reqs = (
        LoadRequest("a", [{"type": "text", "text": "hi"}], {}, {"video": 30.0, "audio": 30.0}),
        LoadRequest("b", [{"type": "text", "text": "yo"}], {}, {"audio": 10.0}),
    )
    settings = {"concurrency": (1, 2), "warmup": 1, "count": 4, "max_tokens": 3, **kw}
    return Workload("test", reqs, **settings)


def _sse(chunks: list[dict], delay: float):
    """Server-sent events, ``delay`` seconds before each chunk (a stream httpx reads lazily)."""

    def gen():
        for chunk in chunks:
            time.sleep(delay)
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return gen()


def _client(handler) -> EndpointClient:
    client = EndpointClient(parse_model_source("http://h/v1"), retries=0,
                            transport=httpx.MockTransport(handler))  # fmt: skip
    client.resolve_model()
    return client


def test_streaming_server_gets_ttft_and_latency_and_media_hours():
    bodies = []

    def handler(request):
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json=MODELS)
        body = json.loads(request.content)
        bodies.append(body)
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        chunks = [{"choices": [{"delta": {"content": "x"}}]},
                  {"choices": [{"delta": {"content": "y"}}]},
                  {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}]  # fmt: skip
        return httpx.Response(200, content=_sse(chunks, 0.05),
                              headers={"content-type": "text/event-stream"})  # fmt: skip

    result = run_load(_client(handler), _workload())
    assert result["stream"] is True and result["ttft_not_available"] is None
    assert [lv["concurrency"] for lv in result["levels"]] == [1, 2]
    assert len(bodies) == 1 + 4 + 4  # warm-up, then 4 per level
    assert all(b["max_tokens"] == 3 and b["temperature"] == 0 and b["model"] == "m" for b in bodies)
    for lv in result["levels"]:
        assert lv["requests"] == 4 and lv["errors"] == 0 and "not_available" not in lv
        # Each answer's first token comes after one 50 ms gap, the end after three.
        assert 0.05 <= lv["ttft_s"]["p50"] < lv["latency_s"]["p50"]
        assert lv["latency_s"]["p50"] >= 0.15
        # Requests cycle a, b, a, b: 60 s of video, 80 s of audio per level.
        assert lv["media_seconds"] == {"video": 60.0, "audio": 80.0}
        wall = lv["wall_s"]
        assert lv["media_hours_per_hour"]["video"] == pytest.approx(60.0 / wall, rel=1e-4)
        assert lv["requests_per_s"] == pytest.approx(4 / wall, rel=1e-4)
        assert lv["input_tokens_per_s"] == pytest.approx(28 / wall, rel=1e-4)
        assert lv["output_tokens_per_s"] == pytest.approx(8 / wall, rel=1e-4)
        assert [r["id"] for r in lv["records"]] == ["a", "b", "a", "b"]


def test_a_server_that_refuses_stream_gets_latency_and_ttft_na_with_its_reason():
    def handler(request):
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json=MODELS)
        if json.loads(request.content).get("stream"):
            return httpx.Response(400, json={"error": {"message": "stream: streaming is not "
                                  "supported; send stream=false", "param": "stream"}})  # fmt: skip
        return httpx.Response(200, json={"choices": [{"message": {"content": "x"}}],
                                         "usage": {"prompt_tokens": 5, "completion_tokens": 1}})  # fmt: skip

    result = run_load(_client(handler), _workload(concurrency=(2,)))
    assert result["stream"] is False
    (lv,) = result["levels"]
    assert lv["ttft_s"] is None and lv["latency_s"]["p50"] > 0
    assert lv["not_available"]["ttft_s"].startswith("the server does not stream (HTTP 400: stream:")
    assert lv["requests_per_s"] > 0 and lv["output_tokens_per_s"] > 0


def test_one_failed_request_makes_the_level_na_never_a_partial_figure():
    calls = []

    def handler(request):
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json=MODELS)
        calls.append(1)
        if len(calls) == 3:  # the second request of the first level
            return httpx.Response(500, json={"error": {"message": "out of memory"}})
        if len(calls) > 3:
            raise httpx.ReadTimeout("timed out")
        return httpx.Response(200, json={"choices": [], "usage": {"prompt_tokens": 1,
                                         "completion_tokens": 1}})  # fmt: skip

    result = run_load(_client(handler), _workload(concurrency=(1, 2)))
    first, second = result["levels"]
    for lv in (first, second):
        assert lv["errors"] >= 1
        assert all(lv[k] is None for k in ("requests_per_s", "latency_s", "media_hours_per_hour",
                                           "input_tokens_per_s", "ttft_s"))  # fmt: skip
    assert first["requests"] == 2  # nothing started after the failure (concurrency 1)
    assert first["not_available"].startswith("1 of 2 requests failed (first: HTTP 500: out of memory)")
    assert "ReadTimeout" in second["not_available"]

    def down(request):
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json=MODELS)
        raise httpx.ConnectError("refused")

    result = run_load(_client(down), _workload())
    assert result["levels"] == [] and "warm-up request a failed: ConnectError" in result["error"]


def test_summarize_level_counts_missing_usage_as_not_available():
    from omniquant.endpoint.client import TimedAnswer

    req = LoadRequest("a", [], {}, {"video": 4.0})
    answers = []
    for start in (0.0, 1.0):
        a = TimedAnswer(start)
        a.end = start + 2.0
        answers.append(a)
    lv = summarize_level([(0, req, answers[0]), (1, req, answers[1])], 2, None)
    assert lv["wall_s"] == 3.0 and lv["requests_per_s"] == pytest.approx(2 / 3)
    assert lv["media_hours_per_hour"] == {"video": pytest.approx(8 / 3), "audio": None}
    assert lv["input_tokens_per_s"] is None
    assert lv["not_available"]["tokens_per_s"] == "the server reports no usage for some requests"
    assert lv["latency_s"] == {"p50": 2.0, "p99": 2.0}


def _wav(path: Path, seconds: float) -> None:
    import numpy as np
    import soundfile as sf

    sf.write(str(path), np.zeros(int(16000 * seconds), dtype="float32"), 16000)


def test_workload_file_states_clip_lengths_and_they_are_checked(tmp_path):
    _wav(tmp_path / "a.wav", 2.0)
    video = ROOT / "tasks" / DEMO_TASKS / "video" / "eval-motion_direction-000.mp4"
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps({"id": "c1", "prompt": "Describe.\n<audio>", "audio": "a.wav",
                    "audio_seconds": 2.0}) + "\n"
        + json.dumps({"id": "c2", "prompt": "What moves?", "video": str(video),
                      "video_seconds": 1.0}) + "\n"
    )  # fmt: skip
    wl = read_workload_file(good, concurrency=(1,), count=2)
    assert [r.id for r in wl.requests] == ["c1", "c2"]
    assert wl.requests[0].seconds == {"audio": 2.0}
    assert [p["type"] for p in wl.requests[0].parts] == ["text", "audio_url"]
    assert wl.requests[1].parts[0]["type"] == "video_url"  # no marker: media first
    assert wl.describe()["media_seconds_per_cycle"] == {"video": 1.0, "audio": 2.0}

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"id": "x", "prompt": "p", "audio": "a.wav", "audio_seconds": 30}) + "\n"
        + json.dumps({"id": "y", "prompt": "p", "audio": "a.wav"}) + "\n"
        + "not json\n"
    )  # fmt: skip
    with pytest.raises(DataError) as err:
        read_workload_file(bad, concurrency=(1,), count=1)
    text = str(err.value)
    assert f"{bad}:1: audio_seconds 30 but the file lasts 2.00 s; state the real length" in text
    assert f"{bad}:2: audio_seconds missing; state the clip's length in seconds" in text
    assert f"{bad}:3: not a clip line" in text


def test_load_settings_are_checked_before_any_model_work(tmp_path):
    from omniquant.experiments.compare import build_report

    base = {"baseline": "http://127.0.0.1:9/v1", "candidates": ["http://127.0.0.1:9/v1"],
            "tasks": "omni-smoke", "out": tmp_path / "r"}  # fmt: skip
    with pytest.raises(ReportError, match="give exactly one of"):
        build_report(**base, throughput=True, load_requests=2, load_duration=3.0)
    with pytest.raises(ReportError, match=r"load_concurrency.*levels >= 1"):
        build_report(**base, throughput=True, load_concurrency=[0])
    with pytest.raises(ReportError, match="add throughput"):
        build_report(**base, gpu_hour_price=2.0)
    with pytest.raises(ReportError, match="load_generator.*choose builtin or aiperf"):
        build_report(**base, throughput=True, load_generator="locust")
    with pytest.raises(ReportError, match="no aiperf program at /nonexistent/aiperf"):
        build_report(**base, throughput=True, load_generator="aiperf", aiperf="/nonexistent/aiperf")
    with pytest.raises(ReportError, match="aiperf load generator needs load_requests"):
        build_report(**base, throughput=True, load_generator="aiperf", load_duration=5.0)
    assert not (tmp_path / "r" / "report.json").exists()


def test_capacity_arithmetic_on_the_demo_config():
    from omniquant.models.base import adapter_for, read_config
    from omniquant.quantize.serving_memory import concurrent_sequences, sequence_bytes

    config = read_config(demo_model_dir())
    shapes = adapter_for(demo_model_dir()).serving_state_shapes(config)
    # Demo text config: 1 attention layer (2 KV heads x 32), 3 Mamba layers (8 heads x 32,
    # state 16, 2 groups, kernel 4).
    per_seq, formula = sequence_bytes(shapes, tokens=100, kv_bytes=2)
    kv = 1 * 2 * 2 * 32 * 100 * 2
    mamba = 3 * (8 * 32 * 16 * 4 + 3 * (8 * 32 + 2 * 2 * 16) * 2)
    assert per_seq == kv + mamba and "1 attention layers" in formula
    assert sequence_bytes(shapes, 100, 1)[0] == kv // 2 + mamba  # FP8 KV: 1 byte
    cap = concurrent_sequences(demo_model_dir(), 100, "FP8", 10_000_000, 2**30)
    assert cap["sequences"] == (2**30 - 10_000_000) // (kv // 2 + mamba)
    assert cap["kind"] == "arithmetic"
    assert concurrent_sequences(demo_model_dir(), 100, None, 2**31, 2**30)["sequences"] == 0
    hub = {"llm_config": {k: v for k, v in config["text_config"].items()
                          if k != "layers_block_type"}}  # fmt: skip
    hub["llm_config"]["hybrid_override_pattern"] = "M-M*-E"
    hub_shapes = adapter_for(demo_model_dir()).serving_state_shapes(hub)
    assert sequence_bytes(hub_shapes, 100, 2)[0] == kv + 2 * mamba // 3


def _report_with_throughput(price: float | None) -> dict:
    def model(name, acc, rps, video, err=None):
        level = {"concurrency": 4, "requests": 8, "errors": 0, "wall_s": 2.0,
                 "requests_per_s": rps, "input_tokens_per_s": 100.0, "output_tokens_per_s": 10.0,
                 "ttft_s": None, "latency_s": {"p50": 0.5, "p99": 0.9},
                 "media_hours_per_hour": {"video": video, "audio": None},
                 "cost_per_media_hour": None if price is None or video is None else {"video": price / video,
                                                                     "audio": None}}  # fmt: skip
        if err:
            level = {**level, **dict.fromkeys(("requests_per_s", "latency_s",
                     "media_hours_per_hour", "cost_per_media_hour")), "errors": 1,
                     "not_available": err}  # fmt: skip
        return {"name": name, "precision": name.upper(), "bits_per_weight": 8.0,
                "overall": {"accuracy": acc}, "throughput": {"server": "vllm server",
                "machine": "1x H100", "levels": [level],
                "capacity": {"kind": "arithmetic", "sequences": 12, "tokens": 90,
                             "bytes_per_sequence": 2**20, "kv_bytes": 1, "weight_bytes": 2**30,
                             "gpu_bytes": 80 * 2**30}}}  # fmt: skip

    return {
        "throughput": {"workload": {"media_seconds_per_cycle": {"video": 60.0, "audio": 0.0},
                                    "source": "w", "concurrency": [4], "max_tokens": 3},
                       "chart_concurrency": 4, "gpu_hour_price": price,
                       "gpu_memory_bytes": 80 * 2**30},
        "baseline": model("bf16", 0.8, 2.0, 9.0),
        "candidates": [model("fp8", 0.79, 3.0, 12.0),
                       model("nvfp4", 0.7, None, None, err="1 of 8 requests failed (first: HTTP 500)")],
    }  # fmt: skip


def test_cost_tables_and_chart_show_measured_figures_and_na_with_reasons():
    from omniquant.report import cost, svg
    from omniquant.report.table import render_throughput_lines

    report = _report_with_throughput(2.0)
    models = [report["baseline"], *report["candidates"]]
    header, rows = cost.throughput_table(report, models)
    assert header[4] == "req/s" and rows[0][4] == "2.000" and rows[1][9] == "12.000"
    assert rows[0][-1] == "vllm server @ 1x H100"
    assert rows[0][11] == f"{2.0 / 9.0:.2f}" and rows[2][4] == "n/a" and rows[2][11] == "n/a"
    assert cost.not_available_notes(report, models) == [
        "nvfp4 at concurrency 4: 1 of 8 requests failed (first: HTTP 500)"
    ]
    points, x_label, y_label, size = cost.chart_points(report, models)
    assert points[0] == ("bf16", pytest.approx(2.0 / 9.0), 0.8, 2.0)
    assert points[2] == ("nvfp4", None, 0.7, None)
    assert x_label == "cost per hour of video ($, at 2 $/GPU-hour)" and size == "requests/s"
    chart = svg.bubble_chart(points, "t", x_label, y_label, size)
    assert chart.count("<circle") == 2 and "nvfp4 (n/a)" in chart
    _, cap_rows = cost.capacity_table(report, models)
    assert cap_rows[0][2] == "12"
    lines = render_throughput_lines(report)
    assert "bf16: vllm server; machine: 1x H100" in lines
    assert "bf16: 12 concurrent sequences of 90 tokens fit in 80 GiB (arithmetic, not measured)" in lines

    no_price = _report_with_throughput(None)
    _, x_label, _, _ = cost.chart_points(no_price, [no_price["baseline"]])
    assert x_label == "hours of video processed per wall-clock hour"


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def demo_three(tmp_path_factory):
    from omniquant.demo import DEMO_CALIB
    from omniquant.quantize.pipeline import quantize

    root = tmp_path_factory.mktemp("tput_exports")
    out = {"bf16": demo_model_dir()}
    for name, recipe in (("fp8", "fp8_omni"), ("nvfp4", "nvfp4_omni")):
        out[name] = quantize(demo_model_dir(), recipe, root / name, calib=DEMO_CALIB, quiet=True).out
    return out


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_report_throughput_serves_bf16_fp8_nvfp4_and_writes_the_cost_side(demo_three, tmp_path):
    """``omniquant report --throughput`` with local checkpoints: each is served by
    ``omniquant serve`` started (and stopped) by the report, on a free port."""
    from omniquant.cli import main

    out = tmp_path / "report"
    code = main([
        "report", "--baseline", f"bf16={demo_three['bf16']}",
        "--candidate", f"fp8={demo_three['fp8']}", "--candidate", f"nvfp4={demo_three['nvfp4']}",
        "--tasks", "omni-smoke", "--out", str(out), "--max-new-tokens", "2",
        "--throughput", "--load-concurrency", "1,2", "--load-requests", "4",
        "--load-max-tokens", "4", "--gpu-hour-price", "2.5", "--gpu-memory", "1GiB",
    ])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    wl = report["throughput"]["workload"]
    assert wl["concurrency"] == [1, 2] and wl["requests_per_level"] == 4 and wl["max_tokens"] == 4
    assert [s["id"] for s in wl["samples"]] == ["vid-right", "vid-up", "aud-beeps", "aud-speech"]
    for m in (report["baseline"], *report["candidates"]):
        block = m["throughput"]
        assert block["emulation"] is True and "CPU emulation" in block["server"]
        # omniquant serve streams (issue #23): time to first token is measured.
        assert block["machine"] and block["stream"] is True
        for lv in block["levels"]:
            assert lv["errors"] == 0 and lv["requests"] == 4
            assert lv["requests_per_s"] > 0 and lv["output_tokens_per_s"] > 0
            assert lv["latency_s"]["p50"] <= lv["latency_s"]["p99"]
            assert 0 < lv["ttft_s"]["p50"] <= lv["ttft_s"]["p99"] <= lv["latency_s"]["p99"]
            hours = lv["media_hours_per_hour"]
            assert hours["video"] > 0 and hours["audio"] > 0
            assert lv["cost_per_media_hour"]["video"] == pytest.approx(2.5 / hours["video"])
        assert block["capacity"]["kind"] == "arithmetic" and block["capacity"]["sequences"] > 0
        assert Path(block["records"]).is_file()
    kv = {m["name"]: m["throughput"]["capacity"]["kv_bytes"]
          for m in (report["baseline"], *report["candidates"])}  # fmt: skip
    assert kv == {"bf16": 2, "fp8": 1, "nvfp4": 1}
    html = (out / "report.html").read_text()
    assert "Quality vs cost (concurrency 2)" in html and "CPU emulation" in html
    assert "Capacity from memory (arithmetic, not measured)" in (out / "report.md").read_text()


FAKE_AIPERF = """#!{python}
import json, sys
from pathlib import Path
args = sys.argv[1:]
if args == ["--version"]:
    print("0.0-fake"); sys.exit(0)
opt = {{args[i]: args[i + 1] for i in range(1, len(args) - 1) if args[i].startswith("--")}}
lines = Path(opt["--input-file"]).read_text().splitlines()
out = Path(opt["--output-artifact-dir"]); out.mkdir(parents=True)
drop = {drop}
with open(out / "profile_export.jsonl", "w") as fh:
    for k, line in enumerate(lines):
        if k in drop:
            continue
        body = json.loads(line)
        assert body["max_tokens"] == 3 and body["model"] == "m"
        start = 10**9 * (10 + k)
        fh.write(json.dumps({{"metadata": {{"session_num": k, "conversation_id": f"c{{k}}",
            "request_start_ns": start, "request_end_ns": start + 5 * 10**8}},
            "metrics": {{"usage_prompt_tokens": {{"value": 7}},
                         "usage_completion_tokens": {{"value": 2}},
                         "time_to_first_token": {{"value": 100.0, "unit": "ms"}}}}}}) + "\\n")
"""


def test_aiperf_records_are_read_back_and_an_incomplete_run_is_na(tmp_path):
    import sys

    from omniquant.endpoint.aiperf import aiperf_level_runner

    def fake(drop: set) -> str:
        path = tmp_path / f"aiperf{len(drop)}"
        path.write_text(FAKE_AIPERF.format(python=sys.executable, drop=drop))
        path.chmod(0o755)
        return str(path)

    client = _client(lambda request: httpx.Response(200, json=MODELS))
    wl = _workload(concurrency=(2,))
    run = aiperf_level_runner(fake(set()), tmp_path / "a", tokenizer="tok")
    lv = run(client, wl, 2, True, None)
    # 4 bodies sent once each, 1 s apart, 0.5 s each: wall 3.5 s; a, b, a, b media.
    assert lv["requests"] == 4 and lv["wall_s"] == 3.5 and lv["errors"] == 0
    assert lv["media_seconds"] == {"video": 60.0, "audio": 80.0}
    assert lv["ttft_s"] == {"p50": 0.1, "p99": 0.1} and lv["latency_s"]["p50"] == 0.5
    assert lv["input_tokens_per_s"] == pytest.approx(28 / 3.5)
    assert [r["id"] for r in lv["records"]] == ["a", "b", "a", "b"]
    payloads = (tmp_path / "a" / "c2" / "payloads.jsonl").read_text().splitlines()
    assert [json.loads(p)["stream"] for p in payloads] == [True] * 4

    lost = aiperf_level_runner(fake({2}), tmp_path / "b", tokenizer="tok")(client, wl, 2, True, None)
    assert lost["requests_per_s"] is None
    assert lost["not_available"].startswith("aiperf returned 3 records from 3 sessions for 4 bodies")


def test_a_duration_level_starts_no_request_after_its_time():
    def handler(request):
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json=MODELS)
        time.sleep(0.1)
        return httpx.Response(200, json={"choices": [], "usage": {"prompt_tokens": 1,
                                         "completion_tokens": 1}})  # fmt: skip

    wl = _workload(concurrency=(2,), count=None, duration_s=0.35, warmup=0)
    (lv,) = run_load(_client(handler), wl)["levels"]
    # Two workers, >= 0.1 s per request: at most 4 rounds start before 0.35 s (a loaded
    # machine runs fewer); none starts after it.
    assert 2 <= lv["requests"] <= 8 and lv["errors"] == 0
    assert max(r["start_s"] for r in lv["records"]) < 0.35
