"""Document functions of the lmms-eval demo task (omni_demo_media.yaml).

Media paths in the data are relative to this folder.

- ``doc_to_messages`` (lmms-eval's chat models, e.g. ``openai_compatible``): one user
  turn, the question first and then the media, so that the server rebuilds exactly the
  in-process prompt of tasks/omni-demo (``"<question>\n<image>"``). lmms-eval's own
  default (``doc_to_visual`` + ``doc_to_text``) puts the media first. Image as a PIL image
  (sent as a base64 PNG ``image_url``), video and audio as ``file://`` URLs (sent as
  ``video_url`` with the model argument ``pass_video_url=True``, and as ``audio_url``):
  the server reads them under ``--allowed-local-media-path``.
- ``doc_to_visual`` / ``doc_to_text`` (lmms-eval's simple models): the image, the video's
  path (the simple OpenAI model decodes frames with decord and sends images) and the
  audio's path (sent as ``input_audio``).
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc):
    path = (HERE / doc["media"]).resolve()
    if doc["modality"] == "image":
        from PIL import Image

        return [Image.open(path).convert("RGB")]
    return [str(path)]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"] + "\n"


def doc_to_messages(doc, lmms_eval_specific_kwargs=None):
    path = (HERE / doc["media"]).resolve()
    if doc["modality"] == "image":
        from PIL import Image

        media = {"type": "image", "url": Image.open(path).convert("RGB")}
    else:
        media = {"type": doc["modality"], "url": path.as_uri()}
    return [{"role": "user", "content": [{"type": "text", "text": doc_to_text(doc)}, media]}]


def _norm(text: str) -> str:
    """omniquant's normalize_answer of the first non-empty line (omniquant.evaluate.metrics)."""
    line = next((x.strip() for x in text.strip().splitlines() if x.strip()), "")
    line = unicodedata.normalize("NFKC", line).lower()
    line = re.sub(r"[^\w\s]", " ", line)
    stripped = re.sub(r"\b(a|an|the)\b", " ", line)
    return " ".join((stripped if stripped.strip() else line).split())


def process_results(doc, results):
    return {"exact_match": float(_norm(results[0]) == _norm(doc["answer"]))}
