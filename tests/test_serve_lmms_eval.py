"""Opt-in: lmms-eval's own OpenAI message builder against ``omniquant serve``.

lmms-eval 0.7.3 is not a dev dependency: its dependencies pull torchvision 0.28.0 (whose
operators do not load beside the CPU torch 2.13), decord, wandb and OpenCV. Where it is
installed, this builds the chat messages of the demo's image and audio samples with
``lmms_eval.protocol.ChatMessages.to_openai_messages`` (what its ``openai_compatible``
models send: media parts first, the image as a PNG data URI, audio as ``audio_url`` with
a local path) and checks the server answers them as it answers the report's own
requests (the same layout, the file as a data URI). Skipped without lmms-eval; not run in this repository's CI.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_helpers import serving

from omniquant.demo import DEMO_TASKS
from omniquant.endpoint.protocol import data_uri
from omniquant.evaluate import validate_task_set

lmms_protocol = pytest.importorskip("lmms_eval.protocol")
openai = pytest.importorskip("openai")
pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def test_lmms_eval_messages_are_answered_like_the_reports():
    from PIL import Image

    picks = {}
    for e in validate_task_set(DEMO_TASKS):
        if e.modality in ("image", "audio") and e.metric == "exact_match":
            picks.setdefault(e.modality, e)
    with (
        serving(allowed_local_media_path=ROOT / "tasks" / DEMO_TASKS) as (url, _app, _model),
        openai.OpenAI(base_url=url, api_key="none", max_retries=0) as client,
    ):
        for entry in picks.values():
            text = entry.prompt.replace("<image>", "").replace("<audio>", "").strip()
            if entry.modality == "image":
                media = {"type": "image", "url": Image.open(entry.resolve(entry.images[0]))}
            else:
                media = {"type": "audio", "url": str(entry.resolve(entry.audio[0]))}
            raw = [{"role": "user", "content": [media, {"type": "text", "text": text}]}]
            messages = lmms_protocol.ChatMessages(messages=raw).to_openai_messages()
            theirs = client.chat.completions.create(model="demo", messages=messages,
                                                    max_tokens=4, temperature=0)  # fmt: skip
            # The same layout (media first, then the text) with the file sent as a data URI.
            kind = f"{entry.modality}_url"
            file = entry.resolve((entry.images or entry.audio)[0])
            parts = [{"type": kind, kind: {"url": data_uri(file)}}, {"type": "text", "text": text}]
            ours = client.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": parts}], max_tokens=4,
                temperature=0)  # fmt: skip
            assert theirs.choices[0].message.content == ours.choices[0].message.content
