"""Opt-in: lmms-eval's own OpenAI message builder against ``omniquant serve``.

lmms-eval 0.7.3 is not a dev dependency: it needs a torch/torchvision pair that cannot sit
beside the CPU torch 2.13 (README, "lmms-eval"), so it lives in a venv of its own, named by
``OMNIQUANT_LMMS_EVAL_PYTHON``. This builds the chat messages of the demo's image and audio
samples there, with ``lmms_eval.protocol.ChatMessages.to_openai_messages`` (what its
``openai_compatible`` models send: media parts first, the image as a PNG data URI, audio as
``audio_url`` with a local path), and checks the server answers them as it answers the
report's own requests (the same layout, the file as a data URI). Skipped without that
interpreter (or lmms-eval importable here); not run in this repository's CI.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from serve_helpers import serving

from omniquant.demo import DEMO_TASKS
from omniquant.endpoint.protocol import data_uri
from omniquant.evaluate import validate_task_set

openai = pytest.importorskip("openai")
ROOT = Path(__file__).resolve().parents[1]
LMMS_PYTHON = os.environ.get("OMNIQUANT_LMMS_EVAL_PYTHON") or (
    sys.executable if importlib.util.find_spec("lmms_eval") else None
)
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        LMMS_PYTHON is None,
        reason="opt-in: set OMNIQUANT_LMMS_EVAL_PYTHON to the python of a separate lmms-eval venv",
    ),
]

#: Run in lmms-eval's interpreter: raw messages (an image as its file path) in on stdin,
#: lmms-eval's OpenAI messages out on stdout.
_BUILD = """
import json, sys
from PIL import Image
from lmms_eval.protocol import ChatMessages
out = []
for modality, path, text in json.load(sys.stdin):
    media = {"type": modality, "url": Image.open(path) if modality == "image" else path}
    raw = [{"role": "user", "content": [media, {"type": "text", "text": text}]}]
    out.append(ChatMessages(messages=raw).to_openai_messages())
json.dump(out, sys.stdout)
"""


def _lmms_messages(requests: list[tuple[str, str, str]]) -> list:
    done = subprocess.run([LMMS_PYTHON, "-c", _BUILD], input=json.dumps(requests),
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_lmms_eval_messages_are_answered_like_the_reports():
    picks = {}
    for e in validate_task_set(DEMO_TASKS):
        if e.modality in ("image", "audio") and e.metric == "exact_match":
            picks.setdefault(e.modality, e)
    requests = []
    for entry in picks.values():
        text = entry.prompt.replace("<image>", "").replace("<audio>", "").strip()
        file = entry.resolve((entry.images or entry.audio)[0])
        requests.append((entry.modality, str(file), text))
    built = _lmms_messages(requests)
    assert len(built) == len(requests) == 2
    with (
        serving(allowed_local_media_path=ROOT / "tasks" / DEMO_TASKS) as (url, _app, _model),
        openai.OpenAI(base_url=url, api_key="none", max_retries=0) as client,
    ):
        for (modality, file, text), messages in zip(requests, built):
            theirs = client.chat.completions.create(model="demo", messages=messages,
                                                    max_tokens=4, temperature=0)  # fmt: skip
            # The same layout (media first, then the text) with the file sent as a data URI.
            kind = f"{modality}_url"
            parts = [{"type": kind, kind: {"url": data_uri(Path(file))}}, {"type": "text", "text": text}]
            ours = client.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": parts}], max_tokens=4,
                temperature=0)  # fmt: skip
            assert theirs.choices[0].message.content == ours.choices[0].message.content
