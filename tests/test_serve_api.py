"""``omniquant serve`` against the openai SDK: every field vLLM's server takes that we serve.

The reference answers come from the in-process evaluator's own functions on the same
checkpoint (``omniquant.evaluate.runner``): greedy tokens, teacher-forced log-probabilities.
Limits: ``max_model_len`` refusals in vLLM's wording before any model work, cancellation
of a request whose client went away, the bounded queue (429 + Retry-After), chunked
prefill (a short request overtakes a long prompt), local media only under
``--allowed-local-media-path``, chat templates.
"""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from serve_helpers import serving

from omniquant.demo import DEMO_TASKS
from omniquant.endpoint.protocol import entry_content
from omniquant.evaluate import validate_task_set

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Continue the sequence: 7 8 9 10"
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def server():
    with serving(allowed_local_media_path=ROOT / "tasks" / DEMO_TASKS) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server[0], api_key="none", max_retries=0, timeout=120) as c:
        yield c


def _chat(client, content=PROMPT, **kw):
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": content}], **kw
    )


def _reference(model, text: str, steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the teacher-forced log-probs of ``text`` (the evaluator's functions)."""
    from omniquant.evaluate.runner import _continue, backbone_input

    sample = model.processor(text)
    with torch.no_grad():
        prefix = backbone_input(model.loaded, sample)
        ids = sample.input_ids[0].tolist()
        tokens: list[int] = []
        for _ in range(steps):
            logits = _continue(model.backbone, model.embed, prefix, tokens, 1)
            tokens.append(int(logits[-1].argmax()))
            if tokens[-1] == model.eos:
                break
        full = model.backbone(inputs_embeds=prefix, use_cache=False, logits_to_keep=len(ids))
        logp = torch.log_softmax(full.logits[0].float(), -1)
    return tokens, logp


# ---------------------------------------------------------------------------- fields


def test_chat_greedy_matches_the_evaluator_and_stops(server, client):
    _url, _app, model = server
    tokens, _ = _reference(model, PROMPT, 8)
    r = _chat(client, max_tokens=8)
    assert tokens[-1] == model.eos  # the demo model ends its answer
    want = model.tokenizer.decode(tokens, skip_special_tokens=True)
    assert r.choices[0].message.content == want == "11"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == 8 and r.usage.completion_tokens == len(tokens)
    # A stop string (alone or in a list) cuts the text before it: finish_reason "stop".
    for stop in ("1", ["x", "1"]):
        r = _chat(client, max_tokens=8, stop=stop)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("", "stop")
    r = _chat(client, max_tokens=8, stop=["1"], extra_body={"include_stop_str_in_output": True})
    assert r.choices[0].message.content == "1"
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=8, temperature=0,
                                  stop=["1"])  # fmt: skip
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("", "stop")
    r = _chat(client, max_tokens=1)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 1


def test_completions_echo_logprobs_in_the_legacy_shape(server, client):
    """What lm-eval's loglikelihood sends: echo + logprobs=1 + max_tokens=1."""
    _url, _app, model = server
    tokens, logp = _reference(model, PROMPT, 1)
    ids = model.processor(PROMPT).input_ids[0].tolist()
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=1, temperature=0,
                                  logprobs=1, echo=True, seed=1234)  # fmt: skip
    c = r.choices[0]
    lp = c.logprobs
    assert c.text == PROMPT + model.token_text(tokens[0])
    assert lp.tokens == [model.token_text(t) for t in ids + tokens[:1]]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(want, abs=1e-5)
    assert lp.token_logprobs[-1] == pytest.approx(float(logp[-1].max()), abs=1e-5)
    for top, value in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]):
        assert value in top.values() and len(top) <= 2  # top-1 plus the token itself
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    # Token-id prompts (what lm-eval sends with an HF tokenizer), one or a list.
    r2 = client.completions.create(model="demo", prompt=[ids, ids[:5]], max_tokens=1,
                                   temperature=0, logprobs=1, echo=True)  # fmt: skip
    assert [ch.index for ch in r2.choices] == [0, 1]
    assert r2.choices[0].logprobs.token_logprobs == lp.token_logprobs
    assert r2.choices[0].text == c.text
    assert len(r2.choices[1].logprobs.tokens) == 6
    assert r2.usage.prompt_tokens == len(ids) + 5
    r3 = client.completions.create(model="demo", prompt=[PROMPT, "Continue the sequence: 2 3"],
                                   max_tokens=2, temperature=0)  # fmt: skip
    assert len(r3.choices) == 2 and r3.choices[0].text == "11"


def test_chat_without_max_tokens_runs_to_the_end_of_the_context():
    with (
        serving({"max_model_len": 40}) as (url, _app, _model),
        openai.OpenAI(base_url=url, api_key="none", max_retries=0) as c,
    ):
        r = _chat(c, extra_body={"ignore_eos": True})
        assert r.usage.total_tokens == 40 and r.choices[0].finish_reason == "length"
        # Completions keep vLLM's (and OpenAI's) default of 16 tokens.
        r = c.completions.create(model="demo", prompt=PROMPT, temperature=0,
                                 extra_body={"ignore_eos": True})  # fmt: skip
        assert r.usage.completion_tokens == 16
        with pytest.raises(openai.BadRequestError, match="maximum context length is 40"):
            _chat(c, max_tokens=33)


def test_models_and_one_model(server, client):
    assert [m.id for m in client.models.list().data] == ["demo"]
    card = client.models.retrieve("demo")
    assert card.id == "demo" and card.model_extra["max_model_len"] == 4096
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


@pytest.mark.parametrize(
    "extra",
    [
        {"presence_penalty": 0.5},
        {"frequency_penalty": 1.0},
        {"logit_bias": {"5": 1.0}},
        {"response_format": {"type": "json_object"}},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        {"extra_body": {"min_p": 0.1}},
        {"extra_body": {"no_such_field": 1}},
    ],
)
def test_unimplemented_parameters_are_refused_by_name(client, extra):
    name = next(iter(extra.get("extra_body", extra)))
    with pytest.raises(openai.BadRequestError) as err:
        _chat(client, max_tokens=2, **extra)
    assert err.value.body["message"].startswith(f"{name}: ") and err.value.body["param"] == name


def test_sampling_seed_n_top_p(client):
    kw = {"max_tokens": 6, "temperature": 1.5, "extra_body": {"ignore_eos": True}}
    a = _chat(client, seed=7, **kw).choices[0].message.content
    b = _chat(client, seed=7, **kw).choices[0].message.content
    assert a == b  # same seed, same text
    texts = {_chat(client, seed=s, **kw).choices[0].message.content for s in range(6)}
    assert len(texts) > 1  # the seed changes the draw
    r = _chat(client, seed=7, n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.choices[0].message.content == a
    assert r.usage.completion_tokens == 18
    # top_p small enough keeps only the most likely token: the greedy answer.
    greedy = _chat(client, max_tokens=6).choices[0].message.content
    assert _chat(client, max_tokens=6, temperature=1.0, top_p=1e-6, seed=3).choices[
        0].message.content == greedy  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="n > 1 needs temperature"):
        _chat(client, n=2, max_tokens=2)


def test_streaming_chat_and_completions(client):
    full = _chat(client, max_tokens=8, logprobs=True, top_logprobs=2)
    chunks = list(_chat(client, max_tokens=8, stream=True, logprobs=True, top_logprobs=2,
                        stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]  # fmt: skip
    assert [e.logprob for e in streamed] == [e.logprob for e in full.choices[0].logprobs.content]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    # A stop string inside the stream: the text before it, never the stop itself.
    chunks = list(_chat(client, max_tokens=8, stream=True, stop=["1"]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    assert chunks[-1].choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="demo", prompt=PROMPT, max_tokens=8,
                                            temperature=0, stream=True, echo=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == PROMPT + "11"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_raw_stream_ends_with_done(server):
    url = server[0]
    body = {"messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [x for x in r.iter_lines() if x]
    assert all(x.startswith("data: ") for x in lines) and lines[-1] == "data: [DONE]"


# ---------------------------------------------------------------------------- limits


def test_oversized_prompts_are_refused_before_any_model_work(server, client):
    _url, app, _model = server
    units = app.state.scheduler.units
    huge = " ".join(["7"] * 99_000)  # ~99k tokens
    with pytest.raises(openai.BadRequestError) as err:
        _chat(client, content=huge)
    assert ("This model's maximum context length is 4096 tokens. However, your request has "
            in err.value.body["message"])  # fmt: skip
    assert "Please reduce the length of the input messages." in err.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="is too large: 4095"):
        _chat(client, max_tokens=4095)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="demo", prompt=[5] * 5000, max_tokens=1)
    assert app.state.scheduler.units == units  # not one prefill chunk or step was run


def _wait_idle(url: str, timeout: float = 30) -> dict:
    for _ in range(int(timeout / 0.05)):
        load = httpx.get(url.removesuffix("/v1") + "/health").json()
        if load["running"] == 0 and load["waiting"] == 0:
            return load
        time.sleep(0.05)
    raise AssertionError(f"server still busy: {load}")


def test_a_disconnected_request_stops_and_frees_the_server(server):
    url, app, _model = server
    body = {"messages": [{"role": "user", "content": PROMPT}], "temperature": 0,
            "max_tokens": 4000, "ignore_eos": True}  # fmt: skip
    before = app.state.scheduler.units
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/chat/completions", json=body, timeout=1.0)
    _wait_idle(url)
    spent = app.state.scheduler.units - before
    assert spent < 3000, spent  # stopped long before its 4000 tokens
    # A streaming client that hangs up after two chunks.
    before = app.state.scheduler.units
    with httpx.stream("POST", f"{url}/chat/completions", json={**body, "stream": True},
                      timeout=30) as r:  # fmt: skip
        lines = r.iter_lines()
        next(lines), next(lines)
    _wait_idle(url)
    assert app.state.scheduler.units - before < 3000
    r = httpx.post(f"{url}/chat/completions", json={**body, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200  # still serving


def test_bounded_queue_answers_429_and_short_requests_overtake_long_prompts():
    with serving(max_num_seqs=2, max_queued_requests=0, prefill_chunk=64) as (url, app, _model):
        long_prompt = " ".join(str(7 + i % 20) for i in range(3000))
        done: list[str] = []

        def post(name, body, timeout=120):
            r = httpx.post(f"{url}/completions", json={"prompt": PROMPT, "temperature": 0,
                                                       **body}, timeout=timeout)  # fmt: skip
            done.append(name)
            return r

        long = threading.Thread(target=post, args=("long", {"prompt": long_prompt,
                                                            "max_tokens": 1}))  # fmt: skip
        long.start()
        for _ in range(400):  # the long prompt is in its prefill chunks
            if app.state.scheduler.load()["running"] == 1:
                break
            time.sleep(0.01)
        r = post("short", {"max_tokens": 2})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "11"
        long.join(120)
        assert done == ["short", "long"]
        # Two running (their first streamed token seen), none may wait: the third gets
        # 429 with Retry-After. Closing the streams cancels them.
        slow = {"prompt": PROMPT, "max_tokens": 3000, "ignore_eos": True, "temperature": 0,
                "stream": True}  # fmt: skip
        with (
            httpx.stream("POST", f"{url}/completions", json=slow, timeout=60) as a,
            httpx.stream("POST", f"{url}/completions", json=slow, timeout=60) as b,
        ):
            lines = a.iter_lines(), b.iter_lines()  # kept: a dropped iterator hangs up
            next(lines[0]), next(lines[1])
            assert app.state.scheduler.load() == {"running": 2, "waiting": 0}
            r = httpx.post(f"{url}/completions", json={"prompt": PROMPT, "max_tokens": 1},
                           timeout=30)  # fmt: skip
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "--max-queued-requests 0" in r.json()["error"]["message"]
        _wait_idle(url)


# ---------------------------------------------------------------------------- media, templates


def test_local_media_only_under_the_allowed_path(server, client, tmp_path):
    entry = next(e for e in validate_task_set(DEMO_TASKS) if e.modality == "image"
                 and e.metric == "exact_match")  # fmt: skip
    image = entry.resolve(entry.images[0])
    parts, _ = entry_content(entry)
    by_data_uri = _chat(client, parts, max_tokens=4).choices[0].message.content

    def with_url(url):
        return [p if p["type"] != "image_url" else {"type": "image_url", "image_url": {"url": url}}
                for p in parts]  # fmt: skip

    for url in (f"file://{image}", str(image)):
        assert _chat(client, with_url(url), max_tokens=4).choices[0].message.content == by_data_uri
    outside = tmp_path / "x.png"
    outside.write_bytes(image.read_bytes())
    link = ROOT / "tasks" / DEMO_TASKS / "image" / "_link_outside.png"
    link.symlink_to(outside)
    try:
        for url in (str(outside), f"file://{link}"):
            with pytest.raises(openai.PermissionDeniedError, match="outside the allowed local"):
                _chat(client, with_url(url), max_tokens=4)
    finally:
        link.unlink()
    with pytest.raises(openai.BadRequestError, match="http URLs are refused: this server fetches"):
        _chat(client, with_url("http://example.com/a.png"), max_tokens=4)
    audio = next(e for e in validate_task_set(DEMO_TASKS) if e.modality == "audio")
    path = str(audio.resolve(audio.audio[0]))
    part = [{"type": "text", "text": audio.prompt.replace("<audio>", "")},
            {"type": "audio_url", "audio_url": {"url": path}}]  # fmt: skip
    data = base64.b64encode(Path(path).read_bytes()).decode()
    by_data = [part[0], {"type": "input_audio", "input_audio": {"data": data, "format": "flac"}}]
    assert (_chat(client, part, max_tokens=4).choices[0].message.content
            == _chat(client, by_data, max_tokens=4).choices[0].message.content)  # fmt: skip


def test_local_media_refused_without_the_flag():
    entry = next(e for e in validate_task_set(DEMO_TASKS) if e.modality == "image")
    url = f"file://{entry.resolve(entry.images[0])}"
    with serving({"max_model_len": 64}) as (base, _app, _model):
        parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]
        r = httpx.post(f"{base}/chat/completions", json={"messages": [
            {"role": "user", "content": parts}], "max_tokens": 1}, timeout=60)  # fmt: skip
        assert r.status_code == 400 and "--allowed-local-media-path" in r.json()["error"]["message"]


def test_system_and_multi_turn_through_the_chat_template(client):
    with pytest.raises(openai.BadRequestError, match="need a chat template.*--chat-template"):
        client.chat.completions.create(model="demo", messages=[
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}])  # fmt: skip
    with serving({"chat_template": TEMPLATE}) as (url, _app, model):
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "ok"}, {"role": "user", "content": PROMPT}]  # fmt: skip
        rendered = model.tokenizer.apply_chat_template(
            messages, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=True)
        assert rendered.startswith("<s><|system|>Be brief.\n") and rendered.endswith("<|assistant|>")
        with openai.OpenAI(base_url=url, api_key="none", max_retries=0) as c:
            chat = c.chat.completions.create(model="demo", messages=messages, max_tokens=4,
                                             temperature=0)  # fmt: skip
            # vLLM: the rendered template, tokenized without adding special tokens.
            ids = model.encode(rendered, add_special_tokens=False)
            plain = c.completions.create(model="demo", prompt=ids, max_tokens=4, temperature=0)
        assert chat.usage.prompt_tokens == len(ids) == plain.usage.prompt_tokens
        assert chat.choices[0].message.content == plain.choices[0].text
