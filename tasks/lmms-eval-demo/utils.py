"""Document functions of the lmms-eval demo task (omni_demo_media.yaml).

Media paths in the data are relative to this folder; audio is decoded with soundfile
(lmms-eval's audio convention: ``{"array", "sampling_rate"}``), video is passed as its path.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc):
    path = HERE / doc["media"]
    if doc["modality"] == "image":
        from PIL import Image

        return [Image.open(path).convert("RGB")]
    if doc["modality"] == "audio":
        import soundfile

        array, rate = soundfile.read(str(path), dtype="float32")
        return [{"array": array, "sampling_rate": rate}]
    return [str(path)]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    text = doc["question"]
    if doc.get("choices"):
        text += " Options: " + ", ".join(doc["choices"]) + "."
    return text


def _norm(text: str) -> str:
    text = text.strip().splitlines()[0] if text.strip() else ""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def process_results(doc, results):
    return {"exact_match": float(_norm(results[0]) == _norm(doc["answer"]))}
