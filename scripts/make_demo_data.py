#!/usr/bin/env python
"""Generate the demo model's synthetic omni tasks: train, calibration and evaluation splits.

    python scripts/make_demo_data.py --force            # calib_data/omni-demo + tasks/omni-demo
    python scripts/make_demo_data.py --split train --per-task 300 --out /tmp/omni-demo-train
    python scripts/make_demo_data.py --check            # the splits share no sample

Tasks (one family per modality, answers of one or two tokens):
    * image  ``shape_colour``   colour of one shape (red/green/blue/yellow)
             ``shape_count``    number of shapes (1-4)
             ``read_digit``     the digit printed on a document-like page (0-9)
    * video  ``motion_direction`` where a shape moves (left/right/up/down)
             ``is_moving``      whether anything moves at all (yes/no; EVS pruning can
                                hurt it: a static clip is what EVS drops first)
    * audio  ``pitch``          a tone is high or low
             ``beep_count``     number of beeps (1-3)
             ``spoken_digit``   one digit spoken by espeak-ng (0-9)
    * text   ``next_number``    the next number of a counting sequence

Splits are disjoint by construction and checked:
    * every sample draws from its own RNG keyed by ``(seed, split, task, index)``, so the
      continuous parameters (positions, sizes, colours, frequencies, noise) of two
      splits come from unrelated streams;
    * the discrete parameters are partitioned: espeak speaking rates differ per split
      (train 120 + 15k, calibration 125 + 15k, evaluation 130 + 15k words per minute),
      and counting sequences have 3, 5 or 6 numbers in train, 7 in calibration and 4 in
      evaluation (every last number of an evaluation sequence is the last number of
      some training sequence, so the model has seen each successor);
    * ``--check`` (and ``tests/test_demo_data.py``) hashes the prompt and the decoded
      media content of every sample and fails on any hash shared between splits.

Layout: calibration is ``calib_data/omni-demo/manifest.jsonl`` (the ``omni-mix``
manifest format, modalities interleaved so any prefix covers all four); evaluation is
``tasks/omni-demo/tasks.jsonl``, one JSON per line with ``id``, ``task``,
``modality``, ``prompt``, the media path (``image``/``video``/``audio``), ``answer``,
``metric`` and, for closed answer sets, ``choices``. The training split uses the
evaluation layout (``tasks.jsonl``) in a directory of your choice; it is not shipped.

Prompts put the question first and the medium last, so the medium sits right before
the answer; each task has one fixed prompt. Fixed shapes keep the tasks cheap: images
are 128x128 (16 image tokens), videos 4 frames of 64x64 at 4 fps (2 tubelets of 16
tokens), audio 1.0 s (13 audio tokens) or 1.6 s for beeps. Media are written with the same encoders and bit-exact flags as
``make_calib_data.py``; speech needs espeak-ng (``apt-get install -y espeak-ng``) at
generation time only: the generated files are shipped.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CALIB_OUT = REPO / "calib_data" / "omni-demo"
TASKS_OUT = REPO / "tasks" / "omni-demo"
SPLITS = ("train", "calib", "eval")


def _load_calib_script():
    """``make_calib_data.py``: its encoders (bit-exact video, PCM_16 audio), espeak call
    and per-sample RNG are reused so both shipped sets are made the same way."""
    spec = importlib.util.spec_from_file_location("make_calib_data", Path(__file__).with_name("make_calib_data.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_calib_data", module)
    spec.loader.exec_module(module)
    return module


_mc = _load_calib_script()
write_video, write_audio, espeak, save_png = _mc.write_video, _mc.write_audio, _mc.espeak, _mc.save_png

COLOURS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc",
          "en-gb-x-gbclan", "en-gb-x-gbcwmd"]  # fmt: skip
VARIANTS = ["", "+m1", "+m3", "+m5", "+f1", "+f2", "+f4"]
SPEECH_RATE_OFFSET = {"train": 0, "calib": 5, "eval": 10}
SEQUENCE_LENGTHS = {"train": (3, 5, 6), "calib": (7,), "eval": (4,)}
IMAGE_SIZE, VIDEO_SIZE, VIDEO_FRAMES, VIDEO_FPS = 128, 64, 4, 4
RATE = 16000


@dataclass(frozen=True)
class Task:
    """One task: name, modality, metric, closed answer set (or None) and its builder.

    ``build(rng, index, split, stem)`` writes the sample's media under ``stem`` (a path
    without suffix) and returns ``(prompt, answer, media_path)``; the answer of index
    ``i`` cycles through the answer set so that every split is balanced.
    """

    name: str
    modality: str
    metric: str
    choices: tuple[str, ...] | None
    build: Callable[[np.random.Generator, int, str, Path], tuple[str, str, Path | None]]


def rng_for(seed: int, split: str, task: str, index: int) -> np.random.Generator:
    digest = hashlib.sha256(f"omni-demo:{seed}:{split}:{task}:{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


# ------------------------------------------------------------------------------ drawing


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int = 25) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    """A neutral grey background, light or dark, never close to a task colour."""
    level = int(rng.choice([int(rng.integers(35, 80)), int(rng.integers(170, 235))]))
    return (level, level, level + int(rng.integers(-6, 7)))


def _draw_shape(draw, kind: str, cx: float, cy: float, r: float, fill) -> None:
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:  # triangle
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)


SHAPES = ("circle", "square", "triangle")


def _canvas(rng: np.random.Generator, size: int):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), _background(rng))
    return img, ImageDraw.Draw(img)


# ------------------------------------------------------------------------------ image tasks


def shape_colour(rng, index, split, stem):
    name = list(COLOURS)[index % len(COLOURS)]
    img, draw = _canvas(rng, IMAGE_SIZE)
    r = float(rng.uniform(14, 34))
    cx, cy = rng.uniform(r + 4, IMAGE_SIZE - r - 4, 2)
    _draw_shape(draw, SHAPES[int(rng.integers(0, 3))], cx, cy, r, _jitter(rng, COLOURS[name]))
    path = stem.with_suffix(".png")
    save_png(img, path)
    return "What colour is the shape?\n<image>", name, path


def shape_count(rng, index, split, stem):
    count = 1 + index % 4
    img, draw = _canvas(rng, IMAGE_SIZE)
    placed: list[tuple[float, float, float]] = []
    while len(placed) < count:  # rejection sampling: shapes never touch
        r = float(rng.uniform(9, 17))
        cx, cy = rng.uniform(r + 3, IMAGE_SIZE - r - 3, 2)
        if all(math.hypot(cx - x, cy - y) > r + q + 6 for x, y, q in placed):
            placed.append((cx, cy, r))
    for cx, cy, r in placed:
        colour = COLOURS[list(COLOURS)[int(rng.integers(0, len(COLOURS)))]]
        _draw_shape(draw, SHAPES[int(rng.integers(0, 3))], cx, cy, r, _jitter(rng, colour))
    path = stem.with_suffix(".png")
    save_png(img, path)
    return "How many shapes are there?\n<image>", str(count), path


def read_digit(rng, index, split, stem):
    """A page: grey lines of 'text' around one large printed digit."""
    from PIL import Image, ImageDraw, ImageFont

    digit = index % 10
    paper = tuple(int(v) for v in rng.integers(225, 256, 3))
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), paper)
    draw = ImageDraw.Draw(img)
    for y in range(8, IMAGE_SIZE - 4, int(rng.integers(9, 14))):  # faint text lines
        x0 = int(rng.integers(4, 16))
        draw.line((x0, y, int(rng.integers(60, IMAGE_SIZE - 4)), y), fill=(175, 175, 175), width=2)
    size = int(rng.integers(60, 76))
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=font)
    w, h = right - left, bottom - top
    # near the centre: the demo model's 2-layer vision tower reads it without having
    # to learn much translation invariance
    x = (IMAGE_SIZE - w) // 2 + int(rng.integers(-8, 9)) - left
    y = (IMAGE_SIZE - h) // 2 + int(rng.integers(-8, 9)) - top
    pad = 4
    draw.rectangle((x + left - pad, y + top - pad, x + right + pad, y + bottom + pad), fill=paper)
    ink = tuple(int(v) for v in rng.integers(0, 60, 3))
    draw.text((x, y), str(digit), fill=ink, font=font)
    path = stem.with_suffix(".png")
    save_png(img, path)
    return "Read the digit on the page.\n<image>", str(digit), path


# ------------------------------------------------------------------------------ video tasks


def _moving_shape_frames(rng, velocity: tuple[float, float]) -> list[np.ndarray]:
    """One shape crossing a plain background at constant ``velocity`` (pixels/frame)."""
    from PIL import Image, ImageDraw

    bg = _background(rng)
    colour = _jitter(rng, COLOURS[list(COLOURS)[int(rng.integers(0, len(COLOURS)))]])
    kind = SHAPES[int(rng.integers(0, 3))]
    r = float(rng.uniform(6, 10))
    span = (VIDEO_FRAMES - 1) * np.abs(np.asarray(velocity))
    lo = r + 2 + np.where(np.asarray(velocity) < 0, span, 0)
    hi = VIDEO_SIZE - r - 2 - np.where(np.asarray(velocity) > 0, span, 0)
    start = rng.uniform(lo, hi)
    frames = []
    for t in range(VIDEO_FRAMES):
        img = Image.new("RGB", (VIDEO_SIZE, VIDEO_SIZE), bg)
        cx, cy = start + t * np.asarray(velocity)
        _draw_shape(ImageDraw.Draw(img), kind, float(cx), float(cy), r, colour)
        frames.append(np.asarray(img, dtype=np.uint8))
    return frames


def motion_direction(rng, index, split, stem):
    name = list(DIRECTIONS)[index % 4]
    speed = float(rng.uniform(4.0, 7.0))
    dx, dy = DIRECTIONS[name]
    frames = _moving_shape_frames(rng, (dx * speed, dy * speed))
    path = stem.with_suffix(".mp4")
    write_video(path, frames, VIDEO_FPS, "libx264")
    return "Which way does the shape move?\n<video>", name, path


def is_moving(rng, index, split, stem):
    moving = index % 2 == 0
    if moving:
        angle = float(rng.uniform(0, 2 * math.pi))
        speed = float(rng.uniform(3.5, 7.0))
        velocity = (speed * math.cos(angle), speed * math.sin(angle))
    else:
        velocity = (0.0, 0.0)
    frames = _moving_shape_frames(rng, velocity)
    path = stem.with_suffix(".mp4")
    write_video(path, frames, VIDEO_FPS, "libx264")
    return "Does anything move in the video?\n<video>", "yes" if moving else "no", path


# ------------------------------------------------------------------------------ audio tasks


def _finish_audio(rng, signal: np.ndarray) -> np.ndarray:
    signal = signal + rng.normal(0, float(rng.uniform(0.002, 0.01)), signal.shape)
    return np.clip(signal, -1, 1).astype(np.float32)


def _tone(t: np.ndarray, freq: float, start: float, length: float, amp: float) -> np.ndarray:
    on = (t >= start) & (t < start + length)
    ramp = np.minimum(1.0, np.minimum(t - start, start + length - t) * 200)  # 5 ms fades
    return np.where(on, amp * ramp * np.sin(2 * np.pi * freq * t), 0.0)


def pitch(rng, index, split, stem):
    high = index % 2 == 0
    t = np.arange(RATE) / RATE
    freq = float(rng.uniform(1200, 2400) if high else rng.uniform(150, 350))
    length = float(rng.uniform(0.5, 0.85))
    start = float(rng.uniform(0.02, 0.98 - length))
    signal = _tone(t, freq, start, length, float(rng.uniform(0.2, 0.6)))
    path = stem.with_suffix(".flac")
    write_audio(path, _finish_audio(rng, signal), RATE)
    return "Is the tone high or low?\n<audio>", "high" if high else "low", path


def beep_count(rng, index, split, stem):
    count = 1 + index % 3
    t = np.arange(int(1.6 * RATE)) / RATE
    freq = float(rng.uniform(500, 1000))
    amp = float(rng.uniform(0.2, 0.6))
    signal = np.zeros_like(t)
    at = float(rng.uniform(0.05, 0.3))
    for _ in range(count):
        length = float(rng.uniform(0.12, 0.2))
        signal += _tone(t, freq, at, length, amp)
        at += length + float(rng.uniform(0.18, 0.3))
    path = stem.with_suffix(".flac")
    write_audio(path, _finish_audio(rng, signal), RATE)
    return "How many beeps do you hear?\n<audio>", str(count), path


def spoken_digit(rng, index, split, stem):
    from omniquant.data.media import resample_audio

    digit = index % 10
    voice = VOICES[int(rng.integers(0, len(VOICES)))] + VARIANTS[int(rng.integers(0, len(VARIANTS)))]
    rate_wpm = 120 + 15 * int(rng.integers(0, 5)) + SPEECH_RATE_OFFSET[split]
    data, rate = espeak(DIGIT_WORDS[digit], voice, rate_wpm, int(rng.integers(25, 76)))
    data = resample_audio(np.asarray(data, dtype=np.float32), rate, RATE)
    voiced = np.nonzero(np.abs(data) > 0.01)[0]
    speech = data[voiced[0] : voiced[-1] + 1] if len(voiced) else data
    speech = speech[: RATE - 800] * float(rng.uniform(0.5, 1.0)) / max(1e-3, float(np.abs(speech).max()))
    signal = np.zeros(RATE, dtype=np.float32)
    at = int(rng.integers(400, RATE - len(speech) - 399))
    signal[at : at + len(speech)] = speech
    path = stem.with_suffix(".flac")
    write_audio(path, _finish_audio(rng, signal), RATE)
    return "Which digit is spoken?\n<audio>", str(digit), path


# ------------------------------------------------------------------------------ text task


def sequence_specs(split: str) -> list[tuple[int, int]]:
    """``(start, length)`` of every counting sequence of a split (see the module doc)."""
    return [(start, length) for length in SEQUENCE_LENGTHS[split] for start in range(24)]


def next_number(rng, index, split, stem):
    specs = sequence_specs(split)
    order = rng_for(0, split, "next_number-order", 0).permutation(len(specs))
    start, length = specs[int(order[index % len(specs)])]
    numbers = " ".join(str(n) for n in range(start, start + length))
    return f"Continue the sequence: {numbers}", str(start + length), None


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("shape_colour", "image", "multiple_choice", tuple(COLOURS), shape_colour),
        Task("shape_count", "image", "exact_match", None, shape_count),
        Task("read_digit", "image", "exact_match", None, read_digit),
        Task("motion_direction", "video", "multiple_choice", tuple(DIRECTIONS), motion_direction),
        Task("is_moving", "video", "multiple_choice", ("yes", "no"), is_moving),
        Task("pitch", "audio", "multiple_choice", ("high", "low"), pitch),
        Task("beep_count", "audio", "exact_match", None, beep_count),
        Task("spoken_digit", "audio", "exact_match", None, spoken_digit),
        Task("next_number", "text", "exact_match", None, next_number),
    )
}
MEDIA_KEY = {"image": "image", "video": "video", "audio": "audio"}


# ------------------------------------------------------------------------------ splits


def build_sample(out: Path, split: str, task: Task, index: int, seed: int = 0) -> dict:
    """Write one sample's media under ``out`` and return its task-format line."""
    sample_id = f"{split}-{task.name}-{index:03d}"
    stem = out / task.modality / sample_id
    prompt, answer, path = task.build(rng_for(seed, split, task.name, index), index, split, stem)
    line = {"id": sample_id, "task": task.name, "modality": task.modality, "prompt": prompt}
    if path is not None:
        line[MEDIA_KEY[task.modality]] = path.relative_to(out).as_posix()
    line.update(answer=answer, metric=task.metric)
    if task.choices:
        line["choices"] = list(task.choices)
    return line


def interleave(per_task: int, tasks: list[str]) -> list[tuple[str, int]]:
    """``(task, index)`` pairs in round-robin order over tasks grouped by modality, so that
    any prefix of a few samples covers every modality."""
    by_modality: dict[str, list[str]] = {}
    for name in tasks:
        by_modality.setdefault(TASKS[name].modality, []).append(name)
    flat: list[str] = []
    for k in range(max(len(v) for v in by_modality.values())):
        flat.extend(names[k] for names in by_modality.values() if k < len(names))
    return [(name, index) for index in range(per_task) for name in flat]


def generate_split(out: Path, split: str, per_task: int, seed: int = 0,
                   tasks: list[str] | None = None, force: bool = False) -> list[dict]:  # fmt: skip
    """Write a split to ``out``: ``manifest.jsonl`` (calib) or ``tasks.jsonl`` (train, eval)."""
    if split not in SPLITS:
        raise SystemExit(f"make_demo_data: unknown split {split!r}; choose from {SPLITS}")
    if out.exists():
        if not force:
            raise SystemExit(f"make_demo_data: {out} exists; pass --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    lines = [build_sample(out, split, TASKS[name], index, seed)
             for name, index in interleave(per_task, tasks or list(TASKS))]  # fmt: skip
    if split != "calib":
        name, rows = "tasks.jsonl", lines
    else:  # the calibration manifest format: no task-format fields
        name = "manifest.jsonl"
        keep = ("id", "image", "video", "audio", "prompt", "answer")
        rows = [{k: line[k] for k in keep if k in line} for line in lines]
    with open(out / name, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return lines


# ------------------------------------------------------------------------------ checks


def read_split(root: Path) -> list[dict]:
    """The lines of a generated split directory (either file name)."""
    for name in ("tasks.jsonl", "manifest.jsonl"):
        if (root / name).is_file():
            return [json.loads(x) for x in (root / name).read_text().splitlines() if x.strip()]
    raise SystemExit(f"make_demo_data: {root} has neither tasks.jsonl nor manifest.jsonl")


def media_content(path: Path) -> bytes:
    """The decoded content of a media file (RGB pixels, video frames, 16 kHz waveform).

    Hashing content rather than file bytes makes the split check independent of the
    container: libx264 occasionally writes a different bitstream for the same clip
    (decoded frames are identical), so video file bytes are not reproducible.
    """
    from omniquant.data import media

    suffix = path.suffix.lower()
    if suffix in (".png", ".jpg", ".jpeg"):
        return media.read_image(path).numpy().tobytes()
    if suffix in (".mp4", ".webm"):
        return media.read_video(path).frames.numpy().tobytes()
    return media.read_audio(path).numpy().tobytes()


def sample_hash(root: Path, line: dict) -> str:
    """sha256 of a sample's prompt and the decoded content of its media."""
    h = hashlib.sha256(line["prompt"].encode())
    for key in ("image", "video", "audio"):
        if key in line:
            h.update(b"\0" + key.encode() + b"\0" + media_content(root / line[key]))
    return h.hexdigest()


def check_disjoint(roots: dict[str, Path]) -> dict[str, int]:
    """Fail if two splits (or two samples of a shipped split) share a prompt + media hash.

    Returns:
        Sample count per split.
    """
    seen: dict[str, str] = {}
    counts = {}
    for split, root in roots.items():
        lines = read_split(root)
        counts[split] = len(lines)
        mine: dict[str, str] = {}
        for line in lines:
            digest = sample_hash(root, line)
            where = f"{split}:{line['id']}"
            # the training split may repeat a text prompt; the shipped ones may not
            if digest in seen or (split != "train" and digest in mine):
                raise SystemExit(f"make_demo_data: {where} duplicates {seen.get(digest) or mine[digest]}")
            mine[digest] = where
        seen.update(mine)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=("shipped", *SPLITS), default="shipped",
                        help="'shipped' writes calib and eval to their repository paths")  # fmt: skip
    parser.add_argument("--out", type=Path, help="output directory (for one split)")
    parser.add_argument("--per-task", type=int, help="samples per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", default=None, help=f"comma-separated subset of {','.join(TASKS)}")
    parser.add_argument("--force", action="store_true", help="replace existing output")
    parser.add_argument("--check", action="store_true",
                        help="only check that the shipped splits (and --train DIR) are disjoint")  # fmt: skip
    parser.add_argument("--train", type=Path, help="a train split directory to include in --check")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    if tasks and (unknown := set(tasks) - set(TASKS)):
        parser.error(f"unknown task(s) {sorted(unknown)}; choose from {', '.join(TASKS)}")
    if args.check:
        roots = {"calib": CALIB_OUT, "eval": TASKS_OUT} | ({"train": args.train} if args.train else {})
        print("disjoint:", check_disjoint(roots))
        return
    if args.split == "shipped":
        jobs = [("calib", CALIB_OUT, args.per_task or 4), ("eval", TASKS_OUT, args.per_task or 16)]
    else:
        if args.out is None:
            parser.error("--out is needed with --split")
        jobs = [(args.split, args.out, args.per_task or {"train": 300, "calib": 4, "eval": 16}[args.split])]
    for split, out, per_task in jobs:
        lines = generate_split(out, split, per_task, args.seed, tasks, args.force)
        total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        print(f"{split}: wrote {len(lines)} samples, {total / 1e6:.2f} MB to {out}")


if __name__ == "__main__":
    main()
