#!/usr/bin/env python
"""Generate the shipped ``omni-smoke`` task set (deterministic, tiny media, ~11 samples).

    python scripts/make_smoke_tasks.py --force       # writes tasks/omni-smoke

It exists for tests and for a quick look at the report: every modality (text, image,
video, audio) and every metric (exact_match, multiple_choice, wer) in a few samples.
Images and tone audio are drawn here with Pillow/numpy; videos are drawn frame by
frame and encoded with the calibration generator's bitexact writer; the speech clip
for the WER task is copied from the shipped ``calib_data/omni-mix`` set (generating
speech needs espeak-ng). Encoders come from ``scripts/make_calib_data.py`` so both
sets are written the same way; same library versions, same bytes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_calib_data import rng_for, save_png, tone_signal, write_audio, write_video

SIZE = 48  # pixels: tiny files, and any size is resized to the model's patch grid anyway
COLORS = {"red": (220, 60, 50), "blue": (40, 120, 220), "green": (60, 170, 90)}


def draw_shape(shape: str, color: str):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    d = ImageDraw.Draw(img)
    box = (8, 8, SIZE - 8, SIZE - 8)
    if shape == "circle":
        d.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        d.rectangle(box, fill=COLORS[color])
    else:
        d.polygon([(SIZE // 2, 6), (SIZE - 6, SIZE - 8), (6, SIZE - 8)], fill=COLORS[color])
    return img


def moving_square(direction: str, frames: int = 8) -> list[np.ndarray]:
    """A square crossing a grey background (8 frames: 4 tubelets, so EVS has room)."""
    out = []
    for k in range(frames):
        arr = np.full((SIZE, SIZE, 3), 200, dtype=np.uint8)
        pos = 4 + k * (SIZE - 20) // (frames - 1)
        x, y = (
            (pos, SIZE // 2 - 6) if direction == "right" else (SIZE // 2 - 6, SIZE - 16 - pos + 4)
        )
        arr[y : y + 12, x : x + 12] = (30, 30, 160)
        out.append(arr)
    return out


def build(out: Path, seed: int) -> list[dict]:
    lines: list[dict] = []
    # text
    lines.append(
        {
            "id": "text-add",
            "task": "text-qa",
            "modality": "text",
            "prompt": "What is two plus three? Answer with one word.",
            "answer": "five",
            "metric": "exact_match",
        }
    )
    lines.append(
        {
            "id": "text-sky",
            "task": "text-qa",
            "modality": "text",
            "prompt": "What colour is a clear sky? Answer with one word.",
            "answer": "blue",
            "metric": "exact_match",
        }
    )
    lines.append(
        {
            "id": "text-odd",
            "task": "text-choice",
            "modality": "text",
            "prompt": "Which word is a colour?",
            "answer": "green",
            "choices": ["seven", "green", "left"],
            "metric": "multiple_choice",
        }
    )
    # image
    for sid, shape, color in (("img-circle", "circle", "red"), ("img-square", "square", "blue")):
        rel = f"media/{sid}.png"
        save_png(draw_shape(shape, color), out / rel)
        lines.append(
            {
                "id": sid,
                "task": "image-shape",
                "modality": "image",
                "image": rel,
                "prompt": "<image>\nWhich shape is in the image?",
                "answer": shape,
                "choices": ["circle", "square", "triangle"],
                "metric": "multiple_choice",
            }
        )
    rel = "media/img-triangle.png"
    save_png(draw_shape("triangle", "green"), out / rel)
    lines.append(
        {
            "id": "img-triangle",
            "task": "image-colour",
            "modality": "image",
            "image": rel,
            "prompt": "<image>\nWhat colour is the shape? Answer with one word.",
            "answer": "green",
            "metric": "exact_match",
        }
    )
    # video
    for sid, direction in (("vid-right", "right"), ("vid-up", "up")):
        rel = f"media/{sid}.mp4"
        write_video(out / rel, moving_square(direction), fps=4, codec="libx264")
        lines.append(
            {
                "id": sid,
                "task": "video-motion",
                "modality": "video",
                "video": rel,
                "video_frames": 8,
                "prompt": "<video>\nWhich way does the square move?",
                "answer": direction,
                "choices": ["left", "right", "up", "down"],
                "metric": "multiple_choice",
            }
        )
    # audio
    data, count = tone_signal(rng_for(seed, "aud-beeps"), "beeps", 8000, 3.0)
    rel = "media/aud-beeps.flac"
    write_audio(out / rel, data, 8000)
    lines.append(
        {
            "id": "aud-beeps",
            "task": "audio-count",
            "modality": "audio",
            "audio": rel,
            "prompt": "How many beeps do you hear? Answer with a number.\n<audio>",
            "answer": count,
            "metric": "exact_match",
        }
    )
    speech = ROOT / "calib_data" / "omni-mix" / "audio" / "speech-question.flac"
    rel = "media/aud-speech.flac"
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(speech, out / rel)
    lines.append(
        {
            "id": "aud-speech",
            "task": "audio-asr",
            "modality": "audio",
            "audio": rel,
            "prompt": "<audio>\nTranscribe the audio.",
            "answer": "How many warehouses are in the north region?",
            "metric": "wer",
        }
    )
    return lines


def generate(out: Path, seed: int = 0, force: bool = False) -> Path:
    """Write the set to ``out`` (media plus ``tasks.jsonl``); return ``out``."""
    if out.exists():
        if not force:
            sys.exit(f"make_smoke_tasks: {out} exists; pass --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    lines = build(out, seed)
    with open(out / "tasks.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tasks" / "omni-smoke")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    out = generate(args.out, args.seed, args.force)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    count = len((out / "tasks.jsonl").read_text().splitlines())
    print(f"wrote {count} task samples, {total / 1e3:.1f} kB to {out}")


if __name__ == "__main__":
    main()
