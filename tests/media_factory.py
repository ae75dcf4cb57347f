"""Small media and manifest builders shared by the data tests (a helper module, not a test
module: tests import builders from here and fixtures from conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _png(path: Path, size=(40, 30)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path)


def _wav(path: Path, seconds=0.5, rate=16000) -> None:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    sf.write(str(path), 0.3 * np.sin(2 * np.pi * 440 * t), rate)


def _write_manifest(root: Path, lines: list) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    (root / "manifest.jsonl").write_text(text)
    return root


def make_bad_set(tmp_path: Path) -> Path:
    """Two good lines and three bad media: a truncated PNG, an MP4 that is not a video,
    a missing WAV."""
    root = tmp_path / "set"
    _png(root / "img" / "good.png")
    _png(root / "img" / "trunc.png", size=(64, 64))
    data = (root / "img" / "trunc.png").read_bytes()
    (root / "img" / "trunc.png").write_bytes(data[: len(data) // 2])
    (root / "vid").mkdir(parents=True)
    (root / "vid" / "fake.mp4").write_text("this is not a video\n" * 20)
    _wav(root / "aud" / "good.wav")
    return _write_manifest(
        root,
        [
            {"id": "ok-image", "prompt": "<image> what?", "image": "img/good.png"},
            {"id": "trunc", "prompt": "what?", "image": "img/trunc.png"},
            {"id": "fake", "prompt": "what?", "video": "vid/fake.mp4"},
            {"id": "nowav", "prompt": "what?", "audio": "aud/missing.wav"},
            {"id": "ok-audio", "prompt": "<audio> hear", "audio": "aud/good.wav"},
        ],
    )
