#!/usr/bin/env python
"""Generate the shipped ``omni-mix`` calibration set (deterministic, seeded, small).

    python scripts/make_calib_data.py --out calib_data/omni-mix --force
    python scripts/make_calib_data.py --out /tmp/mix --only image,video,tone,text
                                                # a subset that needs no espeak-ng

Content, chosen so calibration exercises every path of the omni model:
    * image: documents (title, paragraphs, a table) and charts (bar, line, pie,
      horizontal bars) drawn with Pillow; PNG, and JPEG for some charts.
    * video: screen-like clips where little moves (typing, a blinking cursor, slow
      scrolling: most tokens are static, what EVS prunes first) and clips with motion
      (bouncing and rotating shapes, a panning texture: most tokens change, what EVS
      keeps); 64-128 px, 8-16 frames, MP4 (H.264) and WebM (VP9).
    * speech: espeak-ng sentences (WAV at espeak's 22.05 kHz, FLAC at 16 kHz).
    * tone: counted beeps, a chord, a sweep, and a 40 s melody at 8 kHz that spans two
      30 s clips; WAV and FLAC at 8 to 44.1 kHz, so the resampler is exercised.
    * mixed: a chart with a spoken question, a moving video with beeps, two documents.
    * text: text-only prompts.
espeak-ng (Debian package ``espeak-ng``) is needed to generate speech and mixed
samples, never at run time: the generated files are shipped.

Determinism: every sample draws from its own RNG seeded by ``(seed, sample id)``, so a
subset (``--only``) produces byte-identical files to the full run; encoders run
single-threaded with FFmpeg's bitexact flags (no random Matroska segment UID, no
version strings). Identical bytes need the same Pillow/FFmpeg(PyAV)/libsndfile/
espeak-ng versions; ``tests/test_data_sets.py`` checks two runs agree.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

KINDS = ("image", "video", "speech", "tone", "mixed", "text")
_WORD_TEXT = (
    "the model reads every page of the quarterly report and finds the total revenue for "
    "each region while the chart shows a steady rise in sales from march to june and a "
    "small drop in july because the new factory opened late the table lists orders "
    "shipped returned and pending for every warehouse in the north south east and west"
)
WORDS = _WORD_TEXT.split()
MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
COLORS = [(220, 60, 50), (40, 120, 220), (60, 170, 90), (240, 180, 30), (150, 80, 200),
          (30, 170, 170), (230, 110, 170), (110, 110, 110)]  # fmt: skip
COLOR_NAMES = ["red", "blue", "green", "yellow", "purple", "teal", "pink", "grey"]


@dataclass(frozen=True)
class Spec:
    """One sample: its id, kind (for ``--only``) and the function that writes it."""

    id: str
    kind: str
    build: Callable[[Path, np.random.Generator], dict]


def rng_for(seed: int, sample_id: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def sentence(rng: np.random.Generator, n: int) -> str:
    words = [WORDS[int(i)] for i in rng.integers(0, len(WORDS), n)]
    return " ".join(words).capitalize() + "."


def save_png(img, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=True)


def save_jpeg(img, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=88, optimize=True)


# ------------------------------------------------------------------------------ images


def draw_document(rng: np.random.Generator, size: tuple[int, int], title: str, table: bool):
    from PIL import Image, ImageDraw

    width, height = size
    img = Image.new("RGB", size, (252, 252, 248))
    draw = ImageDraw.Draw(img)
    draw.text((16, 12), title, fill=(20, 20, 20), font=font(20))
    draw.line((16, 40, width - 16, 40), fill=(120, 120, 120), width=1)
    y = 50
    body = font(11)
    while y < height - (110 if table else 24):
        line = sentence(rng, int(rng.integers(6, 11)))
        while draw.textlength(line, font=body) > width - 32 and " " in line:
            line = line.rsplit(" ", 1)[0]
        draw.text((16, y), line, fill=(40, 40, 40), font=body)
        y += 15 if rng.random() > 0.15 else 26  # paragraph breaks
    if table:
        top, cols = height - 100, ["Region", "Orders", "Returns"]
        cell_w = (width - 32) // 3
        for r in range(5):
            for c in range(3):
                x0, y0 = 16 + c * cell_w, top + r * 17
                draw.rectangle((x0, y0, x0 + cell_w, y0 + 17), outline=(90, 90, 90))
                text = cols[c] if r == 0 else (
                    ["North", "South", "East", "West"][r - 1] if c == 0 else str(int(rng.integers(10, 999)))
                )  # fmt: skip
                draw.text((x0 + 4, y0 + 3), text, fill=(20, 20, 20), font=body)
    return img


def document(size: tuple[int, int], title: str, table: bool, question: str):
    def build(out: Path, rng: np.random.Generator) -> dict:
        rel = f"images/{out.name}.png"
        save_png(draw_document(rng, size, title, table), out.parent / rel)
        return {"image": rel, "prompt": f"<image>\n{question}", "answer": title}

    return build


def draw_chart(rng: np.random.Generator, style: str, size: tuple[int, int]):
    from PIL import Image, ImageDraw

    width, height = size
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    small = font(10)
    n = int(rng.integers(4, 8))
    labels = MONTHS[:n]
    values = [int(v) for v in rng.integers(5, 100, n)]
    answer = labels[int(np.argmax(values))]
    draw.text((10, 6), f"Sales by month ({style})", fill=(0, 0, 0), font=font(13))
    left, bottom, top, right = 34, height - 24, 30, width - 10
    if style == "pie":
        total, start = sum(values), -90.0
        box = (width // 2 - 70, top + 10, width // 2 + 70, top + 150)
        for i, v in enumerate(values):
            extent = 360.0 * v / total
            draw.pieslice(
                box, start, start + extent, fill=COLORS[i % len(COLORS)], outline=(255, 255, 255)
            )
            start += extent
        for i, label in enumerate(labels):  # legend in two columns below the pie
            x, y = 10 + (i % 2) * 90, top + 158 + (i // 2) * 12
            draw.rectangle((x, y + 2, x + 8, y + 10), fill=COLORS[i % len(COLORS)])
            draw.text((x + 12, y), f"{label} {values[i]}", fill=(0, 0, 0), font=small)
        return img, answer
    if style == "hbar":
        bar_h = (bottom - top) / n
        for i, v in enumerate(values):
            y0 = top + i * bar_h + 3
            draw.rectangle(
                (left, y0, left + (right - left) * v / 100, y0 + bar_h - 6),
                fill=COLORS[i % len(COLORS)],
            )
            draw.text((4, y0), labels[i], fill=(0, 0, 0), font=small)
        return img, answer
    draw.line((left, top, left, bottom), fill=(0, 0, 0))
    draw.line((left, bottom, right, bottom), fill=(0, 0, 0))
    for tick in range(0, 101, 25):
        y = bottom - (bottom - top) * tick / 100
        draw.line((left - 3, y, left, y), fill=(0, 0, 0))
        draw.text((6, y - 6), str(tick), fill=(0, 0, 0), font=small)
    step = (right - left) / n
    points = []
    for i, v in enumerate(values):
        x = left + step * (i + 0.5)
        y = bottom - (bottom - top) * v / 100
        if style == "bar":
            draw.rectangle(
                (x - step * 0.35, y, x + step * 0.35, bottom), fill=COLORS[i % len(COLORS)]
            )
        points.append((x, y))
        draw.text((x - 8, bottom + 4), labels[i], fill=(0, 0, 0), font=small)
    if style == "line":
        draw.line(points, fill=(40, 120, 220), width=2)
        for x, y in points:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(220, 60, 50))
    return img, answer


def chart(style: str, size: tuple[int, int], jpeg: bool = False):
    def build(out: Path, rng: np.random.Generator) -> dict:
        img, answer = draw_chart(rng, style, size)
        rel = f"images/{out.name}.{'jpg' if jpeg else 'png'}"
        (save_jpeg if jpeg else save_png)(img, out.parent / rel)
        return {
            "image": rel,
            "prompt": "<image>\nWhich month has the highest sales?",
            "answer": answer,
        }

    return build


# ------------------------------------------------------------------------------ video


def write_video(path: Path, frames: list[np.ndarray], fps: int, codec: str) -> None:
    """Encode RGB frames single-threaded with bitexact flags (reproducible bytes)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as out:
        out.flags |= av.container.Flags.bitexact.value
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.flags |= av.codec.context.Flags.bitexact.value
        stream.thread_count = 1
        if codec == "libx264":
            stream.options = {"crf": "26", "preset": "medium", "threads": "1"}
        else:
            stream.options = {"crf": "36", "b": "0", "threads": "1", "row-mt": "0", "cpu-used": "4"}
        for array in frames:
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def screen_frames(
    rng: np.random.Generator, size: tuple[int, int], mode: str, count: int
) -> list[np.ndarray]:
    """A text "screen" where little moves: typing, a blinking cursor or slow scrolling."""
    from PIL import Image, ImageDraw

    width, height = size
    dark = bool(rng.integers(0, 2))
    bg, fg = ((24, 26, 30), (200, 220, 200)) if dark else ((250, 250, 250), (30, 30, 30))
    lines = [sentence(rng, int(rng.integers(3, 6))) for _ in range(12)]
    typed = "print(total)"
    frames = []
    for t in range(count):
        img = Image.new("RGB", (width, height + 120), bg)
        draw = ImageDraw.Draw(img)
        # the prompt line sits above the bottom edge (scrolling moves it up into view)
        above = (height - 18) // 11
        for i, line in enumerate(lines if mode == "scroll" else lines[:above]):
            draw.text((4, 4 + i * 11), line, fill=fg, font=font(9))
        y_cursor = 4 + above * 11
        if mode == "typing":
            text = typed[: t + 1]
            draw.text((4, y_cursor), "> " + text, fill=fg, font=font(9))
            x = 4 + draw.textlength("> " + text, font=font(9))
        else:
            x = 4 + draw.textlength("> ", font=font(9))
            draw.text((4, y_cursor), "> ", fill=fg, font=font(9))
        if mode != "blink" or t % 4 < 2:
            draw.rectangle((x + 1, y_cursor, x + 5, y_cursor + 9), fill=fg)
        offset = 2 * t if mode == "scroll" else 0
        frames.append(np.asarray(img.crop((0, offset, width, offset + height)), dtype=np.uint8))
    return frames


def motion_frames(
    rng: np.random.Generator, size: tuple[int, int], mode: str, count: int
) -> list[np.ndarray]:
    """Clips where a lot moves: bouncing balls, a rotating polygon, a panning texture."""
    from PIL import Image, ImageDraw

    width, height = size
    frames = []
    if mode == "pan":
        texture = rng.integers(
            0, 255, (height // 8 + 1, (width + 8 * count) // 8 + 2, 3), dtype=np.uint8
        )
        big = np.asarray(Image.fromarray(texture).resize((texture.shape[1] * 8, texture.shape[0] * 8),
                                                         Image.Resampling.BILINEAR))  # fmt: skip
        return [np.ascontiguousarray(big[:height, 6 * t : 6 * t + width]) for t in range(count)]
    balls = [
        {"pos": rng.uniform(10, min(size) - 10, 2), "vel": rng.uniform(-7, 7, 2),
         "r": int(rng.integers(6, 14)), "color": COLORS[int(rng.integers(0, len(COLORS)))]}
        for _ in range(int(rng.integers(2, 4)))
    ]  # fmt: skip
    for t in range(count):
        img = Image.new("RGB", size, (235, 235, 240))
        draw = ImageDraw.Draw(img)
        if mode == "rotate":
            cx, cy, radius = width / 2, height / 2, min(size) / 3
            angle = t * math.pi / 10
            corners = [(cx + radius * math.cos(angle + k * 2 * math.pi / 5),
                        cy + radius * math.sin(angle + k * 2 * math.pi / 5)) for k in range(5)]  # fmt: skip
            draw.polygon(corners, fill=COLORS[1])
        for ball in balls:
            x, y = ball["pos"]
            r = ball["r"]
            draw.ellipse((x - r, y - r, x + r, y + r), fill=ball["color"])
            ball["pos"] = ball["pos"] + ball["vel"]
            for axis, limit in ((0, width), (1, height)):
                if not r <= ball["pos"][axis] <= limit - r:
                    ball["vel"][axis] *= -1
                    ball["pos"][axis] = min(max(ball["pos"][axis], r), limit - r)
        frames.append(np.asarray(img, dtype=np.uint8))
    return frames


def video(kind: str, mode: str, size: tuple[int, int], count: int, fps: int, codec: str,
          question: str, answer: str | None, sampling: dict | None = None):  # fmt: skip
    def build(out: Path, rng: np.random.Generator) -> dict:
        make = screen_frames if kind == "screen" else motion_frames
        ext = "mp4" if codec == "libx264" else "webm"
        rel = f"videos/{out.name}.{ext}"
        write_video(out.parent / rel, make(rng, size, mode, count), fps, codec)
        line = {"video": rel, "prompt": f"<video>\n{question}", **(sampling or {})}
        if answer is not None:
            line["answer"] = answer
        return line

    return build


# ------------------------------------------------------------------------------ audio


def write_audio(path: Path, samples: np.ndarray, rate: int) -> None:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "FLAC" if path.suffix == ".flac" else "WAV"
    sf.write(str(path), np.clip(samples, -1.0, 1.0), rate, format=fmt, subtype="PCM_16")


def espeak(text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    """Speech from espeak-ng (generation only; the shipped files need no espeak)."""
    import soundfile as sf

    exe = shutil.which("espeak-ng")
    if exe is None:
        sys.exit(
            "make_calib_data: speech samples need espeak-ng (Debian: apt-get install -y "
            "espeak-ng); or leave them out with --only image,video,tone,text"
        )
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        cmd = [exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), text]
        subprocess.run(cmd, check=True, capture_output=True)
        data, rate = sf.read(str(wav), dtype="float32")
    return data, rate


def speech(text: str, voice: str, speed: int, pitch: int, flac16k: bool, question: str):
    def build(out: Path, rng: np.random.Generator) -> dict:
        data, rate = espeak(text, voice, speed, pitch)
        data = data + rng.normal(0, 0.002, data.shape).astype(np.float32)  # room noise
        if flac16k:
            from omniquant.data.media import resample_audio

            data, rate = resample_audio(data, rate, 16000), 16000
            rel = f"audio/{out.name}.flac"
        else:
            rel = f"audio/{out.name}.wav"
        write_audio(out.parent / rel, data, rate)
        return {"audio": rel, "prompt": f"<audio>\n{question}", "answer": text}

    return build


def tone_signal(
    rng: np.random.Generator, mode: str, rate: int, seconds: float
) -> tuple[np.ndarray, str]:
    t = np.arange(int(rate * seconds)) / rate
    out = np.zeros_like(t)
    if mode == "beeps":
        count = int(rng.integers(2, 7))
        freq = float(rng.choice([440.0, 660.0, 880.0]))
        for k in range(count):
            on = (t >= 0.3 + k * 0.45) & (t < 0.5 + k * 0.45)
            out[on] += 0.5 * np.sin(2 * np.pi * freq * t[on])
        answer = str(count)
    elif mode == "chord":
        root = float(rng.choice([220.0, 261.63, 293.66]))
        for ratio in (1.0, 1.26, 1.5):  # major triad
            out += 0.2 * np.sin(2 * np.pi * root * ratio * t)
        out *= np.minimum(1.0, np.minimum(t, seconds - t) * 8)
        answer = "major chord"
    elif mode == "sweep":
        f0, f1 = 200.0, 3000.0
        phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds))
        out = 0.4 * np.sin(phase)
        answer = "rising"
    else:  # melody: notes of a pentatonic scale
        scale = [262.0, 294.0, 330.0, 392.0, 440.0, 523.0]
        note_len = 0.4
        for k in range(int(seconds / note_len)):
            f = scale[int(rng.integers(0, len(scale)))]
            on = (t >= k * note_len) & (t < (k + 0.9) * note_len)
            env = np.minimum(1.0, (t[on] - k * note_len) * 40)
            out[on] += 0.35 * env * np.sin(2 * np.pi * f * t[on])
        answer = "melody"
    out += rng.normal(0, 0.003, out.shape)
    return out.astype(np.float32), answer


def tones(mode: str, rate: int, seconds: float, ext: str, question: str):
    def build(out: Path, rng: np.random.Generator) -> dict:
        data, answer = tone_signal(rng, mode, rate, seconds)
        rel = f"audio/{out.name}.{ext}"
        write_audio(out.parent / rel, data, rate)
        return {"audio": rel, "prompt": f"{question}\n<audio>", "answer": answer}

    return build


# ------------------------------------------------------------------------------ mixed, text


def chart_with_spoken_question(out: Path, rng: np.random.Generator) -> dict:
    img, answer = draw_chart(rng, "bar", (256, 192))
    save_png(img, out.parent / f"images/{out.name}.png")
    data, rate = espeak("Which month has the highest sales?", "en-us", 160, 50)
    write_audio(out.parent / f"audio/{out.name}.wav", data, rate)
    return {"image": f"images/{out.name}.png", "audio": f"audio/{out.name}.wav",
            "prompt": "<image>\n<audio>\nAnswer the spoken question about the chart.",
            "answer": answer}  # fmt: skip


def video_with_beeps(out: Path, rng: np.random.Generator) -> dict:
    write_video(
        out.parent / f"videos/{out.name}.mp4",
        motion_frames(rng, (96, 96), "bounce", 12),
        8,
        "libx264",
    )
    data, answer = tone_signal(rng, "beeps", 16000, 1.5)
    write_audio(out.parent / f"audio/{out.name}.flac", data, 16000)
    return {"video": f"videos/{out.name}.mp4", "audio": f"audio/{out.name}.flac",
            "prompt": "<video>\n<audio>\nHow many beeps do you hear while the balls move?",
            "answer": answer}  # fmt: skip


def two_documents(out: Path, rng: np.random.Generator) -> dict:
    rels = []
    for k, title in enumerate(("Invoice 2041", "Invoice 2042")):
        rel = f"images/{out.name}-{k}.png"
        save_png(draw_document(rng, (256, 320), title, table=k == 1), out.parent / rel)
        rels.append(rel)
    return {"images": rels, "prompt": "Compare <image> and <image>: which one has a table?",
            "answer": "the second"}  # fmt: skip


def text(prompt: str, answer: str | None = None):
    def build(out: Path, rng: np.random.Generator) -> dict:
        return {"prompt": prompt, **({"answer": answer} if answer else {})}

    return build


# ------------------------------------------------------------------------------ the set


def omni_mix_specs() -> list[Spec]:
    """The samples of ``omni-mix``, interleaved by modality so that the first N samples
    of the manifest already cover every modality."""
    image = [
        Spec("doc-report", "image", document((384, 512), "Quarterly Report", True, "What is the title of the document?")),
        Spec("doc-memo", "image", document((512, 352), "Factory Memo", False, "Read the heading of this page.")),
        Spec("doc-letter", "image", document((320, 448), "Shipping Notice", True, "What kind of document is this?")),
        Spec("doc-wide", "image", document((640, 256), "Regional Orders", False, "Summarize the page in one sentence.")),
        Spec("chart-bar", "image", chart("bar", (320, 240))),
        Spec("chart-line", "image", chart("line", (320, 224))),
        Spec("chart-pie", "image", chart("pie", (256, 288), jpeg=True)),
        Spec("chart-hbar", "image", chart("hbar", (288, 256), jpeg=True)),
    ]  # fmt: skip
    video_specs = [
        Spec("screen-typing", "video", video("screen", "typing", (128, 96), 12, 8, "libx264", "What is being typed on the screen?", "print(total)")),
        Spec("screen-blink", "video", video("screen", "blink", (96, 96), 16, 8, "libvpx-vp9", "Is anything moving in the video?", "only the cursor")),
        Spec("screen-scroll", "video", video("screen", "scroll", (128, 96), 16, 8, "libx264", "Which way does the text move?", "up", {"video_fps": 4.0})),
        Spec("screen-static", "video", video("screen", "static", (96, 64), 8, 4, "libvpx-vp9", "Describe the screen.", None)),
        Spec("motion-bounce", "video", video("motion", "bounce", (96, 96), 16, 8, "libx264", "How many balls are moving?", None)),
        Spec("motion-rotate", "video", video("motion", "rotate", (128, 128), 12, 8, "libvpx-vp9", "What shape is rotating?", "a pentagon")),
        Spec("motion-pan", "video", video("motion", "pan", (128, 96), 16, 8, "libx264", "Which way does the camera pan?", "right", {"video_frames": 8})),
        Spec("motion-bounce-webm", "video", video("motion", "bounce", (64, 64), 10, 10, "libvpx-vp9", "Describe the motion.", None)),
    ]  # fmt: skip
    audio = [
        Spec("speech-fox", "speech", speech("The quick brown fox jumps over the lazy dog.", "en-us", 165, 50, False, "Transcribe the audio.")),
        Spec("speech-report", "speech", speech("Sales rose from March to June and fell slightly in July.", "en-gb", 150, 40, True, "Transcribe the audio.")),
        Spec("speech-numbers", "speech", speech("Order number four two seven, shipped on the ninth of May.", "en-gb-x-rp", 140, 60, False, "What is the order number?")),
        Spec("speech-question", "speech", speech("How many warehouses are in the north region?", "en-us", 175, 35, True, "Answer the spoken question.")),
        Spec("tone-beeps", "tone", tones("beeps", 16000, 3.2, "wav", "How many beeps do you hear?")),
        Spec("tone-chord", "tone", tones("chord", 44100, 2.0, "flac", "Is this a major or a minor chord?")),
        Spec("tone-sweep", "tone", tones("sweep", 22050, 2.5, "wav", "Does the pitch rise or fall?")),
        Spec("tone-melody-long", "tone", tones("melody", 8000, 40.0, "flac", "Describe the music.")),
    ]  # fmt: skip
    mixed = [
        Spec("mixed-chart-speech", "mixed", chart_with_spoken_question),
        Spec("mixed-video-beeps", "mixed", video_with_beeps),
        Spec("mixed-two-docs", "mixed", two_documents),
    ]
    texts = [
        Spec("text-math", "text", text("What is 17 times 23? Answer with a number.", "391")),
        Spec("text-code", "text", text("Write a Python function that returns the sum of a list of numbers.")),
        Spec("text-summary", "text", text("Summarize in one sentence: the factory opened late, so July sales fell after a steady rise from March to June.")),
        Spec("text-reason", "text", text("A warehouse ships 40 orders a day and 5 percent come back. How many returns in a 30 day month?", "60")),
        Spec("text-chat", "text", text("Explain what calibration data is used for when quantizing a neural network.")),
        Spec("text-list", "text", text("List three primary colours, one per line.")),
    ]  # fmt: skip
    groups = [image, video_specs, audio, mixed, texts]
    ordered: list[Spec] = []
    for i in range(max(len(g) for g in groups)):
        ordered.extend(g[i] for g in groups if i < len(g))
    return ordered


def generate(out: Path, seed: int = 0, only: set[str] | None = None, force: bool = False) -> Path:
    """Write the set to ``out`` (its media plus ``manifest.jsonl``); return ``out``."""
    if out.exists():
        if not force:
            sys.exit(f"make_calib_data: {out} exists; pass --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    lines = []
    for spec in omni_mix_specs():
        if only is not None and spec.kind not in only:
            continue
        line = spec.build(out / spec.id, rng_for(seed, spec.id))
        lines.append({"id": spec.id, **line})
    with open(out / "manifest.jsonl", "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, sort_keys=False, ensure_ascii=False) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "calib_data" / "omni-mix"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--only", default=None, help=f"comma-separated kinds out of {','.join(KINDS)}"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    only = None
    if args.only:
        only = {k.strip() for k in args.only.split(",") if k.strip()}
        if unknown := only - set(KINDS):
            parser.error(f"unknown kind(s) {sorted(unknown)}; choose from {', '.join(KINDS)}")
    out = generate(args.out, args.seed, only, args.force)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    count = len((out / "manifest.jsonl").read_text().splitlines())
    print(f"wrote {count} samples, {total / 1e6:.2f} MB to {out}")


if __name__ == "__main__":
    main()
