"""A small built-in synthetic calibration set (text, image, video, audio).

Policy: this exists so that ``omniquant quantize`` runs with no data at all; its
media are seeded random tensors shaped exactly as the omni processor would produce
them (image patches with an even grid, square video frames in temporal pairs,
Parakeet-shaped mel features), with placeholder runs of the right length. Real
calibration should use a manifest set (``--calib omni-mix`` or a directory).
"""

from __future__ import annotations

import torch

from omniquant.data.batch import Sample
from omniquant.data.processing import (
    AUDIO_END,
    AUDIO_START,
    AUDIO_TOKEN,
    IMAGE_END,
    IMAGE_START,
    IMAGE_TOKEN,
)

_PROMPTS = [
    "Describe what you see.",
    "How many objects are in the picture?",
    "Which way does the square move?",
    "Transcribe the audio.",
    "What colour is the shape?",
    "Summarize the document in one sentence.",
    "Is anything moving in the video?",
    "What is the pitch of the tone?",
]


def synthetic_samples(loaded, n: int = 16, seed: int = 0) -> list[Sample]:
    """Return ``n`` samples cycling text, image, video and audio (plus image+audio)."""
    model, tok = loaded.model, loaded.tokenizer
    cfg = model.config
    patch = cfg.vision_config.patch_size
    t_patch = cfg.video_temporal_patch_size
    gen = torch.Generator().manual_seed(seed)
    kinds = ["text", "image", "video", "audio", "image+audio"]
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        prompt = _PROMPTS[i % len(_PROMPTS)]
        pieces, extra = [], {}
        if "image" in kind:
            gh, gw = (4, 6) if i % 2 else (6, 4)
            extra["pixel_values"] = torch.randn(gh * gw, 3 * patch * patch, generator=gen)
            extra["image_grid_hw"] = torch.tensor([[gh, gw]])
            pieces.append(IMAGE_START + IMAGE_TOKEN * (gh * gw // 4) + IMAGE_END)
        if kind == "video":
            frames, side = 4, 4 * patch
            base = torch.randn(1, 3, side, side, generator=gen)
            drift = 0.3 * torch.randn(frames, 3, side, side, generator=gen)
            extra["pixel_values_videos"] = base + drift  # mostly static: EVS has work to do
            per_tubelet = (side // patch) ** 2 // 4
            pieces += [IMAGE_START + IMAGE_TOKEN * per_tubelet + IMAGE_END] * (frames // t_patch)
        if "audio" in kind:
            n_frames = 160 + 40 * (i % 3)
            mels = cfg.audio_config.num_mel_bins
            extra["input_features"] = torch.randn(1, n_frames, mels, generator=gen)
            mask = torch.ones(1, n_frames, dtype=torch.long)
            extra["input_features_mask"] = mask
            n_tok = loaded.adapter.audio_tokens(model, mask)
            pieces.append(AUDIO_START + AUDIO_TOKEN * n_tok + AUDIO_END)
        text = "".join(pieces) + prompt
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        out.append(Sample(id=f"synthetic-{i:03d}-{kind}", input_ids=ids, meta={"kind": kind}, **extra))
    return out
