"""Turn a manifest entry (prompt + media) into a ``Sample`` the omni model takes.

Policy: match the semantics of transformers' ``nemotron_h_omni`` processor (image and
video processors, Parakeet feature extractor, placeholder expansion) with torch only.
transformers' image processor imports torchvision, which has no CPU build for the
pinned torch, so the image path is re-implemented here: the same patch-grid choice,
float32 antialiased bicubic resize (what torchvision's tensor resize calls), fused
rescale+normalize and patch order. The video path follows transformers' video
processor and the audio path calls transformers' ``ParakeetFeatureExtractor`` itself.
``tests/test_data_processing.py`` compares against transformers wherever its code runs.

Deliberate differences from transformers, each because the model needs it:
    * Video frames default to a square tile (``video_maintain_aspect_ratio=False``):
      the model's EVS reshapes each tubelet's tokens to ``h = w = sqrt(tokens)``, so a
      non-square grid breaks video pruning. Set it to true in
      ``preprocessor_config.json`` (or as an override) to get transformers' default.
    * The frame count is padded to a multiple of the temporal patch size (2) by
      repeating the last frame, exactly what the model's ``get_video_features`` would
      do, so ``pixel_values_videos`` always holds whole tubelets.
    * Audio longer than ``audio_clip_seconds`` (30 s) is cut into equal clips of at
      most 30 s (batch-padded by the feature extractor); its placeholder run is the sum
      of the clips' encoder lengths.

Token counts (``m = round(1 / downsample_ratio)``, 2 for the real model):
    * image: ``grid_h * grid_w / m**2`` with ``(grid_h, grid_w)`` from
      ``image_patch_grid``; run ``<img>`` + ``<image>`` * n + ``</img>``.
    * video: per tubelet ``tile_h * tile_w / m**2``; one ``<img>...</img>`` chunk per
      tubelet (``ceil(T / 2)`` of them) labelled with its frames' timestamps.
    * audio: per clip of ``L`` samples, ``1 + L // hop_length`` mel frames, then
      ``log2(subsampling_factor)`` stride-2 convolutions:
      ``n -> floor((n + 2 * ((k - 1) // 2) - k) / stride) + 1``; run ``<so_start>`` +
      ``<so_embedding>`` * sum + ``<so_end>``.

Prompt rule: ``<image>``, ``<video>`` and ``<audio>`` markers in the prompt are replaced,
in order, by the runs of the sample's images, video and audio files. A modality whose
media have no marker in the prompt is put before the text, each run on its own line, in
the order images, video, audio. The expanded prompt is tokenized as transformers'
processor does (the tokenizer's default special tokens, no chat template).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from omniquant.data.batch import Sample
from omniquant.data.manifest import AUDIO_MARKER, IMAGE_MARKER, VIDEO_MARKER, ManifestEntry
from omniquant.data.media import VideoClip
from omniquant.errors import DataError, ModelLoadError

# Placeholder tokens exactly as transformers' NemotronH omni processor spells them; the one
# definition (the demo builder's tokenizer and the synthetic samples take them from here).
IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN = "<image>", "<video>", "<so_embedding>"
IMAGE_START, IMAGE_END = "<img>", "</img>"
AUDIO_START, AUDIO_END = "<so_start>", "<so_end>"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ProcessorSettings:
    """Every number processing depends on; defaults are transformers' defaults.

    ``from_pretrained`` reads them from the checkpoint (see ``OmniProcessor``); any field
    can be overridden. ``min_num_patches`` and ``video_target_num_patches`` default to
    ``min(1024, max_num_patches)`` when the checkpoint does not set them, so that a
    checkpoint that only caps ``max_num_patches`` (like omniquant's tiny ones) gets that
    cap (transformers would raise the budget back to its 1024-patch minimum).
    """

    patch_size: int = 16
    downsample_ratio: float = 0.5
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    min_num_patches: int = 1024
    max_num_patches: int = 13312
    max_model_len: int = 16384
    video_target_num_patches: int = 1024
    video_maintain_aspect_ratio: bool = False
    temporal_patch_size: int = 2
    sampling_rate: int = 16000
    feature_size: int = 128
    hop_length: int = 160
    n_fft: int = 512
    win_length: int = 400
    preemphasis: float = 0.97
    audio_clip_seconds: float = 30.0
    subsampling_factor: int = 8
    subsampling_kernel_size: int = 3
    subsampling_stride: int = 2

    @property
    def merge_size(self) -> int:
        """Pixel-shuffle factor per side (2 for ``downsample_ratio`` 0.5)."""
        return round(1 / self.downsample_ratio)


# ---------------------------------------------------------------------------- images


def image_patch_budget(num_images: int, settings: ProcessorSettings) -> int:
    """Patches each image of one sample may use (transformers' per-call budget): the
    context length in pre-shuffle patches, clamped to ``[min_num_patches, max_num_patches]``."""
    m2 = settings.merge_size**2
    budget = max((settings.max_model_len - 4) * m2, settings.min_num_patches * num_images)
    if settings.max_num_patches:
        budget = min(budget, settings.max_num_patches)
    return max(budget, settings.min_num_patches)


def image_patch_grid(
    height: int, width: int, patch_size: int, merge_size: int, min_patches: int, max_patches: int
) -> tuple[int, int]:
    """The ``(grid_h, grid_w)`` patch grid an image is resized to.

    Start from about the image's own grid, scale it down into ``max_patches`` or up to ``min_patches`` keeping the aspect
    ratio, then make both sides multiples of ``merge_size`` (rounding up while the
    budget allows, down otherwise, never below ``merge_size``).
    """
    # Kept as transformers writes it: Python rounds halves to even, so an exact multiple
    # k * patch_size starts at k (k even) or k + 1 (k odd); other sizes at floor + 1.
    grid_h = round(height / patch_size + 0.5)
    grid_w = round(width / patch_size + 0.5)
    factor = min(math.sqrt(max_patches / (grid_h * grid_w)), 1.0)
    grid_h, grid_w = math.floor(factor * grid_h), math.floor(factor * grid_w)
    if max_patches > min_patches and grid_h * grid_w < min_patches:
        factor = math.sqrt(min_patches / (grid_h * grid_w))
        grid_h, grid_w = math.ceil(factor * grid_h), math.ceil(factor * grid_w)
    if remainder := grid_h % merge_size:
        if (grid_h + merge_size - remainder) * grid_w <= max_patches:
            grid_h += merge_size - remainder
        else:
            grid_h = max(merge_size, grid_h - remainder)
    if remainder := grid_w % merge_size:
        if grid_h * (grid_w + merge_size - remainder) <= max_patches:
            grid_w += merge_size - remainder
        else:
            grid_w = max(merge_size, grid_w - remainder)
    return grid_h, grid_w


def images_to_patches(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, (H/p) * (W/p), C * p * p)``: patches in row-major grid
    order, each laid out channel-major ``(C, p, p)``, the order RADIO's packed path
    un-flattens (``view(-1, C, p, p)``) and adds position embeddings in."""
    batch, channels, height, width = images.shape
    rows, cols = height // patch_size, width // patch_size
    patches = images.reshape(batch, channels, rows, patch_size, cols, patch_size)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * cols, channels * patch_size**2)


def _resize(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Float32 antialiased bicubic resize, as torchvision's tensor resize does (no clamp,
    so the bicubic overshoot survives, as in transformers)."""
    frames = frames.to(torch.float32)
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    return torch.nn.functional.interpolate(
        frames, size=(height, width), mode="bicubic", align_corners=False, antialias=True
    )


def preprocess_images(
    images: list[torch.Tensor], settings: ProcessorSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize, normalize and patchify the images of one sample.

    Args:
        images: ``(3, H, W)`` uint8 (or float 0..255) RGB tensors.
        settings: Processing settings.

    Returns:
        ``pixel_values`` ``(total_patches, 3 * p * p)`` float32 and ``image_grid_hw``
        ``(num_images, 2)`` int64.
    """
    p = settings.patch_size
    budget = image_patch_budget(len(images), settings)
    # transformers folds the 1/255 rescale into mean and std (fused normalize).
    mean = torch.tensor(settings.image_mean, dtype=torch.float32).view(3, 1, 1) * 255.0
    std = torch.tensor(settings.image_std, dtype=torch.float32).view(3, 1, 1) * 255.0
    all_patches, grids = [], []
    for image in images:
        _check_chw(image, "image")
        height, width = image.shape[-2:]
        grid_h, grid_w = image_patch_grid(
            height, width, p, settings.merge_size, settings.min_num_patches, budget
        )
        resized = _resize(image[None], grid_h * p, grid_w * p)
        normalized = (resized - mean) / std
        all_patches.append(images_to_patches(normalized, p)[0])
        grids.append((grid_h, grid_w))
    return torch.cat(all_patches), torch.tensor(grids, dtype=torch.long)


def image_token_count(grid_hw: tuple[int, int], settings: ProcessorSettings) -> int:
    """Placeholder tokens of one image: its patch grid after pixel shuffle."""
    return grid_hw[0] * grid_hw[1] // settings.merge_size**2


# ---------------------------------------------------------------------------- video


def video_tile(height: int, width: int, settings: ProcessorSettings) -> tuple[int, int]:
    """The ``(tile_h, tile_w)`` patch grid every frame of a video is resized to.

    Square by default: side ``floor(sqrt(target))`` rounded down to a multiple of the
    merge size. With ``video_maintain_aspect_ratio``, transformers' aspect-keeping tile
    (rounded up to the merge size while within the target, else down).
    """
    target, div = settings.video_target_num_patches, settings.merge_size
    if not settings.video_maintain_aspect_ratio:
        side = max(div, (int(math.sqrt(target)) // div) * div)
        return side, side
    aspect = width / max(height, 1)
    ph = max(round(math.sqrt(target / aspect)), 1)
    pw = max(round(math.sqrt(target * aspect)), 1)
    if div > 1:
        rem_h, rem_w = ph % div, pw % div
        ph_up, pw_up = ph + (div - rem_h if rem_h else 0), pw + (div - rem_w if rem_w else 0)
        if ph_up * pw_up <= target:
            ph, pw = ph_up, pw_up
        else:
            ph, pw = max(div, ph - rem_h), max(div, pw - rem_w)
    return ph, pw


def preprocess_video(frames: torch.Tensor, settings: ProcessorSettings) -> tuple[torch.Tensor, int]:
    """Resize and normalize video frames; pad the count to whole tubelets.

    Args:
        frames: ``(T, 3, H, W)`` uint8 RGB frames.
        settings: Processing settings.

    Returns:
        ``pixel_values_videos`` ``(T', 3, tile_h * p, tile_w * p)`` float32 with ``T'``
        the next multiple of ``temporal_patch_size`` (last frame repeated), and the
        number of tokens per tubelet.
    """
    if frames.ndim != 4 or frames.shape[1] != 3 or frames.shape[0] < 1:
        raise DataError(f"video frames must be (T, 3, H, W) with T >= 1, got {tuple(frames.shape)}")
    tile_h, tile_w = video_tile(frames.shape[-2], frames.shape[-1], settings)
    p = settings.patch_size
    resized = _resize(frames, tile_h * p, tile_w * p)
    mean = torch.tensor(settings.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(settings.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    normalized = (resized / 255.0 - mean) / std
    short = (-normalized.shape[0]) % settings.temporal_patch_size
    if short:
        normalized = torch.cat([normalized, normalized[-1:].expand(short, -1, -1, -1)])
    return normalized, tile_h * tile_w // settings.merge_size**2


def video_placeholder(
    num_frames: int,
    tokens_per_tubelet: int,
    settings: ProcessorSettings,
    fps: float | None = None,
    frame_indices: list[int] | None = None,
) -> str:
    """The expansion of ``<video>``: one labelled ``<img>`` chunk per tubelet.

    Labels follow transformers: ``"Frame 1 sampled at 0.00 seconds and frame 2 sampled
    at 0.50 seconds: "`` (``"Frame 1 and frame 2: "`` without a frame rate); the
    timestamp of a frame is its source index times ``int(1000 / fps)`` ms. ``num_frames``
    is the count before padding, so a short last tubelet names one frame.
    """
    chunk = IMAGE_START + IMAGE_TOKEN * tokens_per_tubelet + IMAGE_END
    tp = settings.temporal_patch_size
    frame_ms = int(1000.0 / fps) if fps else None
    labels = []
    for group in range((num_frames + tp - 1) // tp):
        parts = []
        for offset in range(tp):
            index = group * tp + offset
            if index >= num_frames:
                break
            prefix = "Frame" if offset == 0 else "frame"
            if frame_ms is not None and frame_indices is not None and index < len(frame_indices):
                parts.append(
                    f"{prefix} {index + 1} sampled at {frame_indices[index] * frame_ms / 1000.0:.2f} seconds"
                )
            elif fps:
                parts.append(f"{prefix} {index + 1} sampled at {index / fps:.2f} seconds")
            else:
                parts.append(f"{prefix} {index + 1}")
        labels.append(" and ".join(parts) + ": ")
    return "\n".join(label + chunk for label in labels)


# ---------------------------------------------------------------------------- audio


def split_audio_clips(num_samples: int, settings: ProcessorSettings) -> list[tuple[int, int]]:
    """``(start, end)`` of the equal clips of at most ``audio_clip_seconds`` a waveform
    is cut into (equal, so no clip is a few samples long)."""
    limit = int(settings.audio_clip_seconds * settings.sampling_rate)
    count = max(1, math.ceil(num_samples / limit))
    size = math.ceil(num_samples / count)
    return [(start, min(start + size, num_samples)) for start in range(0, num_samples, size)]


def audio_encoder_length(num_samples: int, settings: ProcessorSettings) -> int:
    """Audio embeddings the Parakeet encoder emits for one clip of ``num_samples``.

    ``1 + L // hop`` mel frames (centre-padded STFT), which is also what the model
    derives from ``input_features_mask`` (``mask.sum() + 1``), through
    ``log2(subsampling_factor)`` convolutions of kernel ``k`` and stride ``s`` with
    padding ``(k - 1) // 2``: ``n -> floor((n + 2 * ((k - 1) // 2) - k) / s) + 1``.
    """
    k, s = settings.subsampling_kernel_size, settings.subsampling_stride
    length = 1 + num_samples // settings.hop_length
    for _ in range(int(math.log2(settings.subsampling_factor))):
        length = (length + (k - 1) // 2 * 2 - k) // s + 1
    return length


# ---------------------------------------------------------------------------- prompt


def expand_prompt(
    prompt: str, image_runs: list[str], video_run: str | None, audio_runs: list[str]
) -> str:
    """Replace media markers by placeholder runs; put unmarked media first (see module doc)."""
    import re

    runs = {IMAGE_MARKER: list(image_runs), VIDEO_MARKER: [video_run] if video_run else [],
            AUDIO_MARKER: list(audio_runs)}  # fmt: skip
    counts = {marker: prompt.count(marker) for marker in runs}
    for marker, items in runs.items():
        if counts[marker] and counts[marker] != len(items):
            raise DataError(
                f"prompt has {counts[marker]} {marker} marker(s) for {len(items)} file(s); use "
                f"one marker per file, or none to put the media first"
            )
    prefix = [run for marker, items in runs.items() if not counts[marker] for run in items]
    pattern = "(" + "|".join(re.escape(m) for m in runs) + ")"
    used = dict.fromkeys(runs, 0)
    out = []
    for piece in re.split(pattern, prompt):
        if piece in runs:
            out.append(runs[piece][used[piece]])
            used[piece] += 1
        else:
            out.append(piece)
    return "".join(run + "\n" for run in prefix) + "".join(out)


# ---------------------------------------------------------------------------- processor


@dataclass
class OmniProcessor:
    """Torch-only counterpart of transformers' ``NemotronH_Omni_Reasoning_V3Processor``.

    Attributes:
        tokenizer: The checkpoint's tokenizer (with the omni placeholder tokens).
        settings: Processing numbers.
        image_token_id: Id of ``<image>`` (also used by video placeholders).
        audio_token_id: Id of ``<so_embedding>``.
    """

    tokenizer: Any
    settings: ProcessorSettings = field(default_factory=ProcessorSettings)
    image_token_id: int = -1
    audio_token_id: int = -1
    _feature_extractor: Any = field(default=None, repr=False)

    def __post_init__(self):
        tokens = [IMAGE_TOKEN, AUDIO_TOKEN, IMAGE_START, IMAGE_END, AUDIO_START, AUDIO_END]
        ids = self.tokenizer.convert_tokens_to_ids(tokens)
        missing = [t for t, i in zip(tokens, ids) if i is None or i == self.tokenizer.unk_token_id]
        if missing:
            raise ModelLoadError(
                f"The tokenizer lacks the omni placeholder token(s) {missing}; use the "
                f"checkpoint's own tokenizer."
            )
        for field_name, token, tokenizer_id in (
            ("image_token_id", IMAGE_TOKEN, ids[0]),
            ("audio_token_id", AUDIO_TOKEN, ids[1]),
        ):
            configured = getattr(self, field_name)
            if configured >= 0 and configured != tokenizer_id:
                # Every prompt would then count the wrong placeholders and fail as if
                # its text held placeholder tokens.
                raise ModelLoadError(
                    f"config.json {field_name} = {configured}, but the tokenizer's {token} is "
                    f"id {tokenizer_id}; the config and the tokenizer come from different "
                    f"checkpoints. Set {field_name} to {tokenizer_id} or use the matching "
                    "tokenizer."
                )
        if self.image_token_id < 0:
            self.image_token_id = ids[0]
        if self.audio_token_id < 0:
            self.audio_token_id = ids[1]

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **overrides: Any) -> OmniProcessor:
        """Build the processor of a checkpoint directory.

        Reads the tokenizer, ``config.json`` (patch size, ``downsample_ratio``,
        ``video_temporal_patch_size``, normalisation, audio subsampling, token ids) and
        ``preprocessor_config.json`` (budgets ``min_num_patches``/``max_num_patches``/
        ``max_model_len``/``video_target_num_patches``, ``video_maintain_aspect_ratio``,
        ``image_mean``/``image_std``, audio ``sampling_rate``/``feature_size``/
        ``hop_length``/``n_fft``/``win_length``/``preemphasis``). Model-structure numbers
        come from ``config.json`` when both files have them.

        Args:
            model_dir: Checkpoint directory.
            **overrides: ``ProcessorSettings`` fields to override (e.g. ``max_num_patches``).

        Raises:
            ModelLoadError: Missing or unreadable files, or an unknown override.
        """
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        config = current_field_names(_read_json(model_dir / "config.json", required=True))
        pre = _read_json(model_dir / "preprocessor_config.json", required=False)
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError) as err:
            raise ModelLoadError(
                f"{model_dir}: cannot load the tokenizer: {_why(model_dir, err)}"
            ) from err
        settings = settings_from_configs(config, pre, **overrides)
        video_id = config.get("video_token_id")
        vocab_video = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
        if isinstance(video_id, int) and vocab_video not in (None, tokenizer.unk_token_id) \
                and video_id != vocab_video:
            raise ModelLoadError(
                f"{model_dir / 'config.json'}: video_token_id = {video_id}, but the tokenizer's "
                f"{VIDEO_TOKEN} is id {vocab_video}; the config and the tokenizer come from "
                f"different checkpoints. Set video_token_id to {vocab_video} or use the "
                "matching tokenizer."
            )  # fmt: skip
        try:
            return cls(
                tokenizer=tokenizer,
                settings=settings,
                image_token_id=int(config.get("image_token_id", -1)),
                audio_token_id=int(config.get("audio_token_id", -1)),
            )
        except ModelLoadError as err:
            raise ModelLoadError(f"{model_dir}: {err}") from None

    @property
    def feature_extractor(self):
        """transformers' ``ParakeetFeatureExtractor`` built from the settings."""
        if self._feature_extractor is None:
            from transformers import ParakeetFeatureExtractor

            s = self.settings
            self._feature_extractor = ParakeetFeatureExtractor(
                feature_size=s.feature_size, sampling_rate=s.sampling_rate, hop_length=s.hop_length,
                n_fft=s.n_fft, win_length=s.win_length, preemphasis=s.preemphasis,
            )  # fmt: skip
        return self._feature_extractor

    def __call__(
        self,
        entry_or_prompt: ManifestEntry | str,
        images: list[torch.Tensor | str | Path] | None = None,
        video: VideoClip | torch.Tensor | str | Path | None = None,
        audio: list[torch.Tensor | str | Path] | None = None,
        *,
        answer: str | None = None,
        sample_id: str = "sample",
    ) -> Sample:
        """Process one sample.

        Args:
            entry_or_prompt: A ``ManifestEntry`` (its media are read from disk), or a
                prompt string with the media given by the other arguments.
            images: Images: ``(3, H, W)`` uint8 tensors or file paths.
            video: A ``VideoClip``, ``(T, 3, H, W)`` uint8 frames, or a file path.
            audio: Waveforms (1-D float at ``sampling_rate``) or file paths.
            answer: Reference answer text (prompt form only).
            sample_id: Sample id (prompt form only).

        Returns:
            The ``Sample``; ``meta["num_tokens"]`` has the placeholder tokens per
            modality (``text`` counts everything else) and, with a video,
            ``meta["video_tubelets"]`` and ``meta["video_tokens_per_tubelet"]``.

        Raises:
            DataError: Images together with a video, markers that do not match the
                media, unreadable media, or audio too short to featurize.
        """
        from omniquant.data import media

        meta: dict[str, Any] = {}
        num_frames, fps = None, None
        if isinstance(entry_or_prompt, ManifestEntry):
            entry = entry_or_prompt
            prompt, answer, sample_id = entry.prompt, entry.answer, entry.id
            images = [entry.resolve(p) for p in entry.images]
            video = entry.resolve(entry.video) if entry.video else None
            audio = [entry.resolve(p) for p in entry.audio]
            num_frames, fps = entry.video_frames, entry.video_fps
            meta.update(source=str(entry.root), line=entry.line, media=entry.media_relpaths())
        else:
            prompt = entry_or_prompt
        images, audio = list(images or []), list(audio or [])
        if images and video is not None:
            raise DataError(f"sample {sample_id!r}: a sample carries images or a video, not both")

        pixel_values = image_grid_hw = pixel_values_videos = None
        input_features = input_features_mask = None
        counts = {"image": 0, "video": 0, "audio": 0}
        image_runs, video_run, audio_runs = [], None, []

        if images:
            decoded = [media.read_image(x) if isinstance(x, (str, Path)) else x for x in images]
            pixel_values, image_grid_hw = preprocess_images(decoded, self.settings)
            for grid in image_grid_hw.tolist():
                n = image_token_count(tuple(grid), self.settings)
                image_runs.append(IMAGE_START + IMAGE_TOKEN * n + IMAGE_END)
                counts["image"] += n

        if video is not None:
            if isinstance(video, (str, Path)):
                video = media.read_video(video, num_frames=num_frames, fps=fps)
            clip = (
                video
                if isinstance(video, VideoClip)
                else VideoClip(video, list(range(len(video))), None)
            )
            pixel_values_videos, per_tubelet = preprocess_video(clip.frames, self.settings)
            real_frames = clip.frames.shape[0]
            video_run = video_placeholder(
                real_frames, per_tubelet, self.settings, clip.fps, clip.frame_indices
            )
            tubelets = pixel_values_videos.shape[0] // self.settings.temporal_patch_size
            counts["video"] = tubelets * per_tubelet
            meta.update(video_tubelets=tubelets, video_tokens_per_tubelet=per_tubelet)

        if audio:
            waveforms = [media.read_audio(x, self.settings.sampling_rate) if isinstance(x, (str, Path))
                         else torch.as_tensor(x, dtype=torch.float32).flatten() for x in audio]  # fmt: skip
            input_features, input_features_mask, per_audio = self._featurize(waveforms, sample_id)
            for n in per_audio:
                audio_runs.append(AUDIO_START + AUDIO_TOKEN * n + AUDIO_END)
                counts["audio"] += n

        text = expand_prompt(prompt, image_runs, video_run, audio_runs)
        input_ids = torch.tensor([self.tokenizer(text).input_ids], dtype=torch.long)
        placeholders = counts["image"] + counts["video"]
        if (
            int((input_ids == self.image_token_id).sum()) != placeholders
            or int((input_ids == self.audio_token_id).sum()) != counts["audio"]
        ):
            raise DataError(
                f"sample {sample_id!r}: the prompt text itself contains {IMAGE_TOKEN} or "
                f"{AUDIO_TOKEN} placeholder tokens; remove them (use the {IMAGE_MARKER}, "
                f"{VIDEO_MARKER}, {AUDIO_MARKER} markers)"
            )
        counts["text"] = input_ids.shape[1] - placeholders - counts["audio"]
        meta["num_tokens"] = {k: counts[k] for k in ("text", "image", "video", "audio")}
        answer_ids = None
        if answer is not None:
            ids = self.tokenizer(answer, add_special_tokens=False).input_ids
            answer_ids = torch.tensor([ids], dtype=torch.long)
        return Sample(
            id=sample_id,
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_grid_hw=image_grid_hw,
            pixel_values_videos=pixel_values_videos,
            input_features=input_features,
            input_features_mask=input_features_mask,
            answer_ids=answer_ids,
            meta=meta,
        )

    def _featurize(
        self, waveforms: list[torch.Tensor], sample_id: str
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Mel features of all clips of all audio inputs, and the tokens per input."""
        s = self.settings
        clips, per_audio = [], []
        for waveform in waveforms:
            if waveform.numel() < s.win_length:
                raise DataError(
                    f"sample {sample_id!r}: audio of {waveform.numel()} samples is shorter than "
                    f"one {s.win_length}-sample analysis window"
                )
            total = 0
            for start, end in split_audio_clips(waveform.numel(), s):
                clips.append(waveform[start:end].numpy())
                total += audio_encoder_length(end - start, s)
            per_audio.append(total)
        features = self.feature_extractor(clips, sampling_rate=s.sampling_rate, return_tensors="pt")
        return features["input_features"], features["attention_mask"], per_audio


def settings_from_configs(config: dict, preprocessor: dict, **overrides: Any) -> ProcessorSettings:
    """``ProcessorSettings`` from a checkpoint's ``config.json`` and
    ``preprocessor_config.json`` dicts (see ``OmniProcessor.from_pretrained``)."""
    vision = config.get("vision_config") or {}
    audio = config.get("audio_config") or {}
    values: dict[str, Any] = {}

    def pick(name: str, *sources: tuple[dict, str]) -> None:
        for source, key in sources:
            if key in source and source[key] is not None:
                values[name] = source[key]
                return

    pick("patch_size", (vision, "patch_size"), (preprocessor, "patch_size"))
    pick("downsample_ratio", (config, "downsample_ratio"), (preprocessor, "downsample_ratio"))
    pick("temporal_patch_size", (config, "video_temporal_patch_size"),
         (preprocessor, "video_temporal_patch_size"))  # fmt: skip
    pick(
        "image_mean",
        (preprocessor, "image_mean"),
        (preprocessor, "norm_mean"),
        (vision, "norm_mean"),
    )
    pick("image_std", (preprocessor, "image_std"), (preprocessor, "norm_std"), (vision, "norm_std"))
    for name in ("min_num_patches", "max_num_patches", "max_model_len", "video_target_num_patches",
                 "video_maintain_aspect_ratio", "sampling_rate", "feature_size", "hop_length",
                 "n_fft", "win_length", "preemphasis"):  # fmt: skip
        pick(name, (preprocessor, name))
    pick("feature_size", (audio, "num_mel_bins"))
    pick("subsampling_factor", (audio, "subsampling_factor"))
    pick("subsampling_kernel_size", (audio, "subsampling_conv_kernel_size"))
    pick("subsampling_stride", (audio, "subsampling_conv_stride"))
    known = {f.name for f in fields(ProcessorSettings)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ModelLoadError(f"Unknown processor setting(s) {unknown}; known: {sorted(known)}")
    values.update(overrides)
    cap = values.get("max_num_patches", ProcessorSettings.max_num_patches)
    for name in ("min_num_patches", "video_target_num_patches"):
        if name not in values and cap:
            values[name] = min(1024, cap)
    for name in ("image_mean", "image_std"):
        if name in values:
            values[name] = tuple(float(x) for x in values[name])
    return replace(ProcessorSettings(), **values)


def current_field_names(config: dict) -> dict:
    """``config.json`` with a released checkpoint's legacy field names (``llm_config``,
    ``sound_config``, ``img_context_token_id``, ...) under their current names, by
    transformers' own mapping for ``nemotron_h_omni`` (a current name present wins)."""
    from transformers.models.nemotron_h_omni.configuration_nemotron_h_omni import (
        NemotronH_Omni_Reasoning_V3_Config,
    )

    out = dict(config)
    for legacy, name in getattr(
        NemotronH_Omni_Reasoning_V3_Config, "_legacy_field_names", {}
    ).items():
        if legacy in out:
            value = out.pop(legacy)
            out.setdefault(name, value)
    return out


def _read_json(path: Path, required: bool) -> dict:
    if not path.is_file():
        if required:
            raise ModelLoadError(f"{path.parent}: no {path.name}; is this a checkpoint directory?")
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path}: cannot read it: {err}") from err


def _check_chw(image: torch.Tensor, what: str) -> None:
    if image.ndim != 3 or image.shape[0] != 3:
        raise DataError(f"{what} must be a (3, H, W) RGB tensor, got {tuple(image.shape)}")


#: The files transformers' fast tokenizer is built from.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _why(model_dir: Path, err: Exception) -> str:
    """Why the tokenizer did not load: a missing tokenizer file named with what the
    directory holds, else transformers' own message. (Without ``tokenizer.json``
    transformers says to install sentencepiece or tiktoken, which does not help.)"""
    missing = [name for name in TOKENIZER_FILES if not (model_dir / name).is_file()]
    if not missing:
        return str(err)
    # Hidden files (omniquant's ownership marker, editors' files) are not what a user looks for.
    held = (
        sorted(p.name for p in model_dir.iterdir() if not p.name.startswith("."))
        if model_dir.is_dir()
        else []
    )
    shown = ", ".join(held[:8]) + (f" and {len(held) - 8} more" if len(held) > 8 else "")
    return (
        f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing (the "
        f"directory holds {shown or 'nothing'}); copy {'it' if len(missing) == 1 else 'them'} "
        "from the checkpoint the weights came from."
    )
