"""Media readers: images (Pillow), video (PyAV), audio (soundfile), decoded to tensors.

Policy: a reader either returns fully decoded data or raises ``MediaError`` (a
``DataError``) naming the file and the reason; it never returns partial data silently.
The ``check_*`` functions run the same decoders for validation only
(``manifest.validate_manifest`` calls them before any model work): images and audio
are decoded whole, videos up to their first frame.

Output forms:
    * image: ``(3, H, W)`` uint8 RGB tensor (alpha is composited on black, palette and
      grey images are converted), the layout the processors take.
    * video: ``VideoClip`` with ``frames`` ``(T, 3, H, W)`` uint8 RGB plus the source
      frame indices and source fps (the prompt labels each frame with its timestamp).
    * audio: 1-D float32 tensor, mono (channels averaged), at ``TARGET_SAMPLING_RATE``
      (16 kHz, Parakeet's rate), resampled with a polyphase windowed-sinc filter
      (``scipy.signal.resample_poly``; torchaudio has no build for the pinned torch).

Heavy imports (PIL, av, soundfile, scipy) stay inside the functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from omniquant.errors import DataError

TARGET_SAMPLING_RATE = 16000
# Frames taken from a video whose manifest line names neither ``video_frames`` nor
# ``video_fps``: enough for 8 tubelets, small enough for CPU calibration.
DEFAULT_VIDEO_FRAMES = 16
# Parakeet's analysis window (400 samples at 16 kHz): shorter audio cannot be featurized.
MIN_AUDIO_SECONDS = 0.025


class MediaError(DataError):
    """A media file is missing or cannot be decoded.

    Attributes:
        path: The file.
        reason: What is wrong, without the path (manifest validation lists the path
            next to the manifest line itself).
    """

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass
class VideoClip:
    """Frames sampled from one video.

    Attributes:
        frames: ``(T, 3, H, W)`` uint8 RGB frames.
        frame_indices: Index of each sampled frame in the source video.
        fps: Source frame rate, or ``None`` when the container does not say.
    """

    frames: torch.Tensor
    frame_indices: list[int]
    fps: float | None


def read_image(path: str | Path) -> torch.Tensor:
    """Decode an image file to a ``(3, H, W)`` uint8 RGB tensor.

    Args:
        path: PNG or JPEG file (any format Pillow decodes works).

    Raises:
        MediaError: The file is missing or cannot be decoded.
    """
    from PIL import Image, ImageOps

    path = _existing(path)
    try:
        with Image.open(path) as img:
            img.load()
            # Camera JPEGs store their rotation in EXIF; apply it as transformers' load_image does.
            rgb = _to_rgb(ImageOps.exif_transpose(img))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise MediaError(path, f"cannot decode image: {err}") from err
    array = np.asarray(rgb, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def check_image(path: str | Path) -> None:
    """Fully decode an image (Pillow ``verify`` then ``load``) or raise ``MediaError``."""
    from PIL import Image

    path = _existing(path)
    try:
        with Image.open(path) as img:
            img.verify()  # structure and CRCs; leaves the image unusable
        with Image.open(path) as img:
            img.load()  # pixel data: catches truncation verify() misses
            if img.width < 1 or img.height < 1:
                raise ValueError("image has zero size")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise MediaError(path, f"cannot decode image: {err}") from err


def _to_rgb(img):
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        # High-bit-depth grayscale: Pillow's convert("RGB") clips values above 255, so a
        # 16-bit scan would turn white. Scale 16-bit (and 32-bit int holding 16-bit data)
        # down to 8 bits; float images are taken as [0, 1] when they fit, else clipped.
        values = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        else:
            scale = 255.0 / 65535.0 if img.mode != "I" or values.max(initial=0) > 255 else 1.0
        gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def sample_frame_indices(
    total_frames: int,
    source_fps: float | None,
    num_frames: int | None = None,
    fps: float | None = None,
) -> list[int]:
    """Pick which source frames to keep.

    Rules: with ``num_frames``, frames are spread uniformly, each taken at the centre of
    its span (``floor((i + 0.5) * total / num_frames)``), all frames if the video is
    shorter; with ``fps``, one frame every ``1 / fps`` seconds starting at frame 0 (needs
    the source fps; frames are never repeated, so ``fps`` above the source rate keeps
    every frame); with neither, ``DEFAULT_VIDEO_FRAMES`` uniform frames.

    Args:
        total_frames: Frames in the source video (> 0).
        source_fps: Source frame rate (needed for ``fps``).
        num_frames: Number of frames to sample.
        fps: Sampling rate in frames per second.

    Returns:
        Sorted, distinct source frame indices.
    """
    if num_frames is not None and fps is not None:
        raise DataError("give either video_frames or video_fps, not both")
    if total_frames <= 0:
        raise DataError("video has no frames")
    if fps is not None:
        if fps <= 0:
            raise DataError(f"video_fps must be > 0, got {fps}")
        if not source_fps:
            raise DataError("video_fps needs a source frame rate, and the container has none")
        step = source_fps / fps
        if step <= 1:
            return list(range(total_frames))
        count = math.floor((total_frames - 1) / step) + 1
        return sorted({min(total_frames - 1, round(k * step)) for k in range(count)})
    if num_frames is None:
        num_frames = DEFAULT_VIDEO_FRAMES
    if num_frames <= 0:
        raise DataError(f"video_frames must be > 0, got {num_frames}")
    if num_frames >= total_frames:
        return list(range(total_frames))
    return [int((i + 0.5) * total_frames / num_frames) for i in range(num_frames)]


def read_video(
    path: str | Path, num_frames: int | None = None, fps: float | None = None
) -> VideoClip:
    """Decode sampled frames of a video file (MP4, WebM, anything FFmpeg in PyAV reads).

    The frame count comes from a demux pass over the packets (cheap, and exact where the
    container's own ``frames`` field is 0, as in WebM); only the selected frames are
    converted to RGB. See ``sample_frame_indices`` for the sampling rules.

    Args:
        path: Video file.
        num_frames: Sample this many frames uniformly.
        fps: Sample at this rate instead.

    Raises:
        MediaError: Missing file, no video stream, undecodable data, or bad sampling args.
    """
    import av

    path = _existing(path)
    _refuse_image_as_video(path)
    try:
        with av.open(str(path)) as container:
            stream = _video_stream(container, path)
            source_fps = float(stream.average_rate) if stream.average_rate else None
            total = sum(1 for packet in container.demux(stream) if packet.size)
        wanted = sample_frame_indices(total, source_fps, num_frames=num_frames, fps=fps)
        wanted_set = set(wanted)
        frames: list[np.ndarray] = []
        indices: list[int] = []
        with av.open(str(path)) as container:
            stream = _video_stream(container, path)
            stream.thread_type = "SLICE"  # deterministic decode order
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted_set:
                    frames.append(frame.to_ndarray(format="rgb24"))
                    indices.append(index)
                if index >= wanted[-1]:
                    break
    except MediaError:
        raise
    except DataError as err:  # bad sampling arguments
        raise MediaError(path, str(err)) from err
    except (av.FFmpegError, OSError, ValueError) as err:
        raise MediaError(path, f"cannot decode video: {err}") from err
    if not frames:
        raise MediaError(path, "cannot decode video: no frame decoded")
    if indices != wanted:
        # Fewer frames decode than packets demux (a cut or damaged stream): the sampled
        # indices, and the timestamps built from them, would be wrong.
        raise MediaError(
            path,
            f"cannot decode video: {total} packets but only {len(frames)} of the "
            f"{len(wanted)} sampled frames decoded (damaged or cut stream); re-encode it",
        )
    sizes = {f.shape for f in frames}
    if len(sizes) != 1:
        raise MediaError(path, f"frames change size mid-stream ({sorted(sizes)}); re-encode it")
    tensor = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()
    return VideoClip(frames=tensor, frame_indices=indices, fps=source_fps)


#: Leading bytes of image formats. FFmpeg opens a single image as a one-frame "video",
#: so a PNG named ``clip.mp4`` in ``video`` would calibrate the video path on a still.
_IMAGE_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
}


def sniff_image_format(path: str | Path) -> str | None:
    """The image format named by a file's first bytes (PNG, JPEG, GIF, BMP, WEBP), else None."""
    with open(path, "rb") as fh:
        head = fh.read(12)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _IMAGE_MAGIC.items() if head.startswith(magic)), None)


def _refuse_image_as_video(path: Path) -> None:
    fmt = sniff_image_format(path)
    if fmt is not None:
        raise MediaError(
            path, f"cannot use as video: the file holds {fmt} image bytes; put it under "
            "'image', or give a video file (MP4, WebM, MKV, ...)"
        )  # fmt: skip


def check_video(path: str | Path) -> None:
    """Open a video and decode its first frame, or raise ``MediaError``."""
    import av

    path = _existing(path)
    _refuse_image_as_video(path)
    try:
        with av.open(str(path)) as container:
            stream = _video_stream(container, path)
            for frame in container.decode(stream):
                frame.to_ndarray(format="rgb24")
                return
    except MediaError:
        raise
    except (av.FFmpegError, OSError, ValueError) as err:
        raise MediaError(path, f"cannot decode video: {err}") from err
    raise MediaError(path, "cannot decode video: no frame decoded")


def _video_stream(container, path: Path):
    if not container.streams.video:
        raise MediaError(path, "cannot decode video: the file has no video stream")
    return container.streams.video[0]


def resample_audio(waveform: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Resample a 1-D signal with a polyphase windowed-sinc (Kaiser, beta 5) filter.

    The rate ratio is reduced exactly (``Fraction``), so 44.1 kHz -> 16 kHz is
    ``160/441``; the filter's cutoff is the lower Nyquist, so no aliasing folds into
    the band the mel features see.
    """
    if orig_rate == target_rate:
        return waveform.astype(np.float32, copy=False)
    from scipy.signal import resample_poly

    ratio = Fraction(target_rate, orig_rate)
    out = resample_poly(waveform.astype(np.float64), ratio.numerator, ratio.denominator)
    return out.astype(np.float32)


def read_audio(path: str | Path, target_rate: int = TARGET_SAMPLING_RATE) -> torch.Tensor:
    """Decode an audio file (WAV, FLAC, anything libsndfile reads) to mono float32 at
    ``target_rate``.

    Raises:
        MediaError: Missing file, undecodable data, or shorter than ``MIN_AUDIO_SECONDS``.
    """
    import soundfile as sf

    path = _existing(path)
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as err:
        raise MediaError(path, f"cannot decode audio: {err}") from err
    if data.shape[0] == 0:
        raise MediaError(path, "cannot decode audio: the file has no samples")
    if data.shape[0] < MIN_AUDIO_SECONDS * rate:
        raise MediaError(
            path, f"audio is {data.shape[0] / rate * 1000:.1f} ms long; at least "
            f"{MIN_AUDIO_SECONDS * 1000:.0f} ms (one analysis window) is needed"
        )  # fmt: skip
    mono = data.mean(axis=1)
    return torch.from_numpy(resample_audio(mono, int(rate), target_rate).copy())


def check_audio(path: str | Path) -> None:
    """Decode a whole audio file or raise ``MediaError``."""
    read_audio(path)


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise MediaError(path, "file not found")
    if not path.is_file():
        raise MediaError(path, "not a regular file")
    return path


def media_seconds(path: str | Path, kind: str) -> float:
    """Duration of a video or audio file in seconds, from its container headers.

    Video: the stream's ``duration x time_base``, else the container's duration, else
    frames / average rate (decoding every frame only when none of these is stated).
    Audio: frames / sample rate (libsndfile). The load phase sums these into hours of
    media processed per hour.

    Raises:
        MediaError: Missing file, unreadable data or no duration to be had.
    """
    path = _existing(path)
    if kind == "audio":
        import soundfile as sf

        try:
            info = sf.info(str(path))
        except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as err:
            raise MediaError(path, f"cannot read audio: {err}") from err
        if not info.samplerate or not info.frames:
            raise MediaError(path, "cannot read audio: no samples")
        return info.frames / info.samplerate
    import av

    try:
        with av.open(str(path)) as container:
            stream = _video_stream(container, path)
            if stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
            if container.duration:
                return container.duration / av.time_base
            rate = stream.average_rate
            frames = stream.frames or sum(1 for _ in container.decode(stream))
            if rate and frames:
                return frames / float(rate)
    except MediaError:
        raise
    except (av.FFmpegError, OSError, ValueError) as err:
        raise MediaError(path, f"cannot read video: {err}") from err
    raise MediaError(path, "cannot read video: the file states no duration and no frame rate")
