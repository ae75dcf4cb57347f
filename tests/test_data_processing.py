"""Torch-only processing: exact grids, patch order, token counts, parity with transformers'
nemotron_h_omni processor code, and forwards of the tiny model on processed samples."""

from __future__ import annotations

import ast
import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from omniquant.data import processing as P
from omniquant.data.manifest import load_manifest
from omniquant.data.processing import OmniProcessor, ProcessorSettings
from omniquant.data.sets import resolve_calib_set
from omniquant.errors import DataError, ModelLoadError

HF_DIR = Path(importlib.util.find_spec("transformers").origin).parent / "models" / "nemotron_h_omni"
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def _hf_functions(*names: str) -> SimpleNamespace:
    """Module-level functions of transformers' omni image processor, taken from its source:
    the module itself imports torchvision, which this environment cannot install."""
    tree = ast.parse((HF_DIR / "image_processing_nemotron_h_omni.py").read_text())
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    assert sorted(d.name for d in defs) == sorted(names)
    namespace = {"math": math, "torch": torch}
    code = compile(ast.Module(body=defs, type_ignores=[]), "hf_image_processing", "exec")
    exec(code, namespace)  # noqa: S102 - transformers' own installed source, nothing external
    return SimpleNamespace(**{name: namespace[name] for name in names})


def _hf_processor_class():
    from transformers.models.nemotron_h_omni.processing_nemotron_h_omni import (
        NemotronH_Omni_Reasoning_V3Processor,
    )

    return NemotronH_Omni_Reasoning_V3Processor


@pytest.fixture(scope="module")
def processor(tiny_dir) -> OmniProcessor:
    return OmniProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def model(tiny_dir):
    from transformers.models.nemotron_h_omni.modeling_nemotron_h_omni import (
        NemotronH_Omni_Reasoning_V3,
    )

    return NemotronH_Omni_Reasoning_V3.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="module")
def mix_entries() -> dict:
    return {e.id: e for e in load_manifest(resolve_calib_set("omni-mix"))}


# ------------------------------------------------------------------------------ settings


def test_settings_from_tiny_checkpoint(processor: OmniProcessor, tiny_dir):
    s = processor.settings
    assert (s.patch_size, s.merge_size, s.temporal_patch_size) == (16, 2, 2)
    assert (s.min_num_patches, s.max_num_patches, s.video_target_num_patches) == (64, 64, 64)
    assert (s.feature_size, s.sampling_rate, s.hop_length, s.subsampling_factor) == (
        128,
        16000,
        160,
        8,
    )
    assert s.image_mean == pytest.approx(P.OPENAI_CLIP_MEAN)
    assert processor.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (
        OmniProcessor.from_pretrained(tiny_dir, max_num_patches=256).settings.max_num_patches == 256
    )
    with pytest.raises(ModelLoadError, match=r"Unknown processor setting\(s\) \['max_patches'\]"):
        OmniProcessor.from_pretrained(tiny_dir, max_patches=3)


# ------------------------------------------------------------------------------ images


def test_patch_grid_matches_transformers():
    hf = _hf_functions("get_patch_grid_size")
    sizes = [1, 15, 16, 17, 31, 32, 48, 50, 64, 100, 180, 224, 333, 480, 512, 640, 1000, 1920, 4000]
    for budget_min, budget_max in [(64, 64), (16, 256), (1024, 13312), (4, 1024)]:
        for height in sizes:
            for width in sizes:
                ours = P.image_patch_grid(height, width, 16, 2, budget_min, budget_max)
                assert ours == hf.get_patch_grid_size(height, width, 16, 2, budget_min, budget_max)
                assert ours[0] % 2 == 0 and ours[1] % 2 == 0


def test_images_to_patches_matches_transformers():
    hf = _hf_functions("convert_image_to_patches")
    images = torch.randn(2, 3, 32, 80)
    assert torch.equal(P.images_to_patches(images, 16), hf.convert_image_to_patches(images, 16))


def test_patch_order_is_row_major_and_channel_major():
    settings = ProcessorSettings(min_num_patches=8, max_num_patches=64)
    image = torch.zeros(3, 32, 64, dtype=torch.uint8)  # grid 2 x 4, no resize
    for row in range(2):
        for col in range(4):
            for channel in range(3):
                image[channel, row * 16 : (row + 1) * 16, col * 16 : (col + 1) * 16] = (
                    10 * (row * 4 + col) + channel
                )
    pixel_values, grid = P.preprocess_images([image], settings)
    assert grid.tolist() == [[2, 4]] and pixel_values.shape == (8, 3 * 16 * 16)
    mean = torch.tensor(settings.image_mean).repeat_interleave(256) * 255
    std = torch.tensor(settings.image_std).repeat_interleave(256) * 255
    raw = pixel_values * std + mean  # undo normalization; tolerance for float32 rounding
    for k in range(8):
        expected = torch.tensor([10 * k + c for c in range(3)], dtype=torch.float32)
        torch.testing.assert_close(raw[k], expected.repeat_interleave(256), atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    ("height", "width", "grid"),
    # min == max == 64 (tiny): scaled down into the budget, never up
    [
        (100, 180, (6, 10)),
        (512, 512, (8, 8)),
        (16, 16, (2, 2)),
        (1000, 50, (32, 2)),
        (32, 64, (2, 4)),
    ],
)
def test_image_token_counts(processor: OmniProcessor, height, width, grid):
    image = torch.randint(
        0, 255, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    sample = processor("<image>\nwhat colour is the shape?", images=[image])
    n = grid[0] * grid[1] // 4
    assert sample.image_grid_hw.tolist() == [list(grid)]
    assert sample.pixel_values.shape == (grid[0] * grid[1], 768)
    ids = sample.input_ids[0].tolist()
    start = processor.tokenizer.convert_tokens_to_ids("<img>")
    end = processor.tokenizer.convert_tokens_to_ids("</img>")
    assert ids[: n + 2] == [start] + [processor.image_token_id] * n + [end]
    assert sample.meta["num_tokens"]["image"] == n
    assert sample.modalities == ("text", "image")


def test_two_images_share_the_budget_and_keep_order(processor: OmniProcessor):
    small = torch.zeros(3, 16, 16, dtype=torch.uint8)
    wide = torch.full((3, 64, 256), 255, dtype=torch.uint8)
    sample = processor("compare <image> and <image>", images=[small, wide])
    assert sample.image_grid_hw.tolist() == [[2, 2], [4, 16]]
    assert sample.pixel_values.shape[0] == 4 + 64
    assert (sample.input_ids == processor.image_token_id).sum() == 1 + 16
    pixels = sample.pixel_values
    assert (pixels[:4] == pixels[0]).all() and (pixels[4:] == pixels[4]).all()
    assert pixels[0, 0] < 0 < pixels[4, 0]  # black first, white second


@pytest.mark.skipif(not HAS_TORCHVISION, reason="transformers' image processor needs torchvision")
def test_images_match_transformers_image_processor():
    from transformers.models.nemotron_h_omni.image_processing_nemotron_h_omni import (
        NemotronH_Omni_Reasoning_V3ImageProcessor,
    )

    settings = ProcessorSettings(min_num_patches=16, max_num_patches=256)
    hf = NemotronH_Omni_Reasoning_V3ImageProcessor(
        image_mean=list(settings.image_mean), image_std=list(settings.image_std),
        min_num_patches=16, max_num_patches=256,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for size in [(100, 180), (333, 64), (64, 64)]:
        images = [torch.randint(0, 255, (3, *size), dtype=torch.uint8, generator=gen)]
        expected = hf(images=images, return_tensors="pt")
        pixel_values, grid = P.preprocess_images(images, settings)
        assert torch.equal(grid, expected["image_grid_hw"])
        # float32 resize + normalize; same kernels, tolerance for op-order rounding
        torch.testing.assert_close(pixel_values, expected["pixel_values"], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ video


@pytest.mark.parametrize("keep_aspect", [False, True])
def test_video_matches_transformers_video_processor(keep_aspect: bool):
    from transformers.models.nemotron_h_omni.video_processing_nemotron_h_omni import (
        NemotronH_Omni_Reasoning_V3VideoProcessor,
    )

    settings = ProcessorSettings(
        video_target_num_patches=64, video_maintain_aspect_ratio=keep_aspect
    )
    hf = NemotronH_Omni_Reasoning_V3VideoProcessor(
        norm_mean=list(settings.image_mean), norm_std=list(settings.image_std),
        video_target_num_patches=64, video_maintain_aspect_ratio=keep_aspect,
    )  # fmt: skip
    frames = torch.randint(
        0, 255, (5, 3, 50, 90), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    expected = hf(videos=[frames], return_tensors="pt")
    ours, per_tubelet = P.preprocess_video(frames, settings)
    assert ours.shape[0] == 6  # padded to whole tubelets by repeating the last frame
    torch.testing.assert_close(ours[:5], expected["pixel_values_videos"], atol=1e-5, rtol=1e-5)
    assert torch.equal(ours[5], ours[4])
    assert per_tubelet == int(expected["num_tokens"][0])
    tile = P.video_tile(50, 90, settings)
    assert ours.shape[-2:] == (tile[0] * 16, tile[1] * 16)
    if not keep_aspect:
        assert tile == (8, 8)  # square: EVS reshapes tokens to sqrt x sqrt


@pytest.mark.parametrize(
    ("frames", "fps", "indices"),
    [(5, None, None), (6, 8.0, [1, 4, 7, 10, 13, 15]), (3, 30.0, None)],
)
def test_video_placeholder_matches_transformers(processor: OmniProcessor, frames, fps, indices):
    hf_self = SimpleNamespace(image_start_token="<img>", image_end_token="</img>", image_token="<image>",
                              video_temporal_patch_dim=2)  # fmt: skip
    metadata = SimpleNamespace(fps=fps, frames_indices=indices) if fps else None
    expected = _hf_processor_class().replace_video_token(
        hf_self, {"num_tokens": [16] * frames}, 0, num_frames=frames, video_metadata=metadata
    )
    assert P.video_placeholder(frames, 16, processor.settings, fps, indices) == expected


def test_video_sample_tokens(processor: OmniProcessor):
    frames = torch.randint(
        0, 255, (7, 3, 64, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)
    )
    sample = processor("<video>\nis anything moving?", video=frames)
    assert sample.pixel_values_videos.shape == (8, 3, 128, 128)
    assert sample.meta["video_tubelets"] == 4 and sample.meta["video_tokens_per_tubelet"] == 16
    assert (sample.input_ids == processor.image_token_id).sum() == 64
    assert sample.meta["num_tokens"]["video"] == 64
    text = processor.tokenizer.decode(sample.input_ids[0])
    assert text.startswith("Frame 1 and frame 2: <img>") and "Frame 7: <img>" in text
    assert sample.modalities == ("text", "video")


def test_images_and_video_together_are_refused(processor: OmniProcessor):
    with pytest.raises(DataError, match="images or a video, not both"):
        processor(
            "x",
            images=[torch.zeros(3, 16, 16, dtype=torch.uint8)],
            video=torch.zeros(2, 3, 16, 16, dtype=torch.uint8),
        )


# ------------------------------------------------------------------------------ audio


def test_audio_token_count_matches_transformers_and_the_encoder(model):
    hf_self = SimpleNamespace(audio_hop_length=160, audio_subsampling_factor=8)
    estimate = _hf_processor_class()._estimate_audio_num_embeddings
    settings = ProcessorSettings()
    tower = model.audio_tower
    for samples in [400, 1599, 1600, 16000, 16001, 48000, 123457, 480000]:
        ours = P.audio_encoder_length(samples, settings)
        assert ours == estimate(hf_self, samples)
        mask_sum = torch.tensor([samples // 160])  # what the feature extractor's mask holds
        assert ours == int(tower._get_subsampling_output_length(mask_sum + 1))
    assert P.audio_encoder_length(480000, settings) == 376  # 30 s: ~12.5 tokens per second


def test_audio_features_are_parakeets_and_long_audio_is_clipped(processor: OmniProcessor):
    from transformers import ParakeetFeatureExtractor

    rng = np.random.default_rng(0)
    short = torch.from_numpy(rng.normal(0, 0.1, 16000 * 3).astype(np.float32))
    sample = processor("<audio>\ntranscribe the audio.", audio=[short])
    expected = ParakeetFeatureExtractor(feature_size=128)(
        [short.numpy()], sampling_rate=16000, return_tensors="pt"
    )
    assert torch.equal(sample.input_features, expected["input_features"])
    assert torch.equal(sample.input_features_mask, expected["attention_mask"])
    assert (
        sample.meta["num_tokens"]["audio"]
        == P.audio_encoder_length(48000, processor.settings)
        == 38
    )

    long = torch.from_numpy(rng.normal(0, 0.1, 16000 * 65).astype(np.float32))
    sample = processor("transcribe the audio.", audio=[long])
    clips = P.split_audio_clips(16000 * 65, processor.settings)
    assert [end - start for start, end in clips] == [346667, 346667, 346666]
    assert sample.input_features.shape == (3, 1 + 346667 // 160, 128)
    assert sample.input_features_mask.sum(-1).tolist() == [2166, 2166, 2166]
    n = sum(P.audio_encoder_length(end - start, processor.settings) for start, end in clips)
    assert (sample.input_ids == processor.audio_token_id).sum() == n == 813
    text = processor.tokenizer.decode(sample.input_ids[0])
    assert text.startswith("<so_start><so_embedding>") and text.endswith(
        "<so_end>\ntranscribe the audio."
    )


def test_too_short_audio_is_refused(processor: OmniProcessor):
    with pytest.raises(DataError, match="shorter than one 400-sample analysis window"):
        processor("x", audio=[torch.zeros(100)])


# ------------------------------------------------------------------------------ prompt


def test_expand_prompt_rule():
    assert P.expand_prompt("a <image> b <image>", ["I1", "I2"], None, []) == "a I1 b I2"
    assert P.expand_prompt("q", ["I1", "I2"], "V", ["A"]) == "I1\nI2\nV\nA\nq"
    assert P.expand_prompt("<audio> then q", ["I"], None, ["A"]) == "I\nA then q"
    assert P.expand_prompt("<video><audio>", [], "V", ["A"]) == "VA"
    with pytest.raises(DataError, match=r"prompt has 2 <audio> marker\(s\) for 1 file"):
        P.expand_prompt("<audio> <audio>", [], None, ["A"])


def test_literal_placeholder_tokens_in_prompt_are_refused(processor: OmniProcessor):
    with pytest.raises(DataError, match="placeholder tokens"):
        processor("hello <so_embedding>")


def test_answer_is_tokenized(processor: OmniProcessor):
    sample = processor("what is 2 + 2?", answer="four", sample_id="q1")
    assert sample.id == "q1" and sample.modalities == ("text",)
    assert processor.tokenizer.decode(sample.answer_ids[0]) == "four"


# ------------------------------------------------------------------------------ forward


def _forward(model, sample):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    kwargs = {"input_ids": sample.input_ids}
    if sample.pixel_values is not None:
        kwargs.update(pixel_values=sample.pixel_values, image_grid_hw=sample.image_grid_hw)
    if sample.pixel_values_videos is not None:
        # forward(pixel_values_videos=...) is broken in transformers 5.23; encode first
        features = model.get_video_features(sample.pixel_values_videos).pooler_output
        kwargs["mm_encoder_outputs"] = {
            "video": BaseModelOutputWithPooling(pooler_output=(features,))
        }
    if sample.input_features is not None:
        kwargs.update(
            input_features=sample.input_features, input_features_mask=sample.input_features_mask
        )
    with torch.no_grad():
        return model(**kwargs).logits


@pytest.mark.parametrize(
    "sample_id",
    ["doc-report", "chart-pie", "mixed-two-docs", "screen-blink", "motion-pan", "tone-melody-long",
     "speech-fox", "mixed-chart-speech", "mixed-video-beeps", "text-math"],
)  # fmt: skip
def test_tiny_forward_on_shipped_samples(model, processor, mix_entries, sample_id):
    sample = processor(mix_entries[sample_id])
    logits = _forward(model, sample)
    assert logits.shape == (1, sample.input_ids.shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_tiny_forward_with_evs_prunes_video_tokens(model, processor, mix_entries):
    sample = processor(mix_entries["motion-bounce"])
    video_tokens = sample.meta["num_tokens"]["video"]
    per_tubelet = sample.meta["video_tokens_per_tubelet"]
    rate = 0.5
    model.video_pruning_rate = rate
    try:
        logits = _forward(model, sample)
    finally:
        model.video_pruning_rate = 0.0
    kept = max(per_tubelet, int(video_tokens * (1 - rate)))
    assert logits.shape[1] == sample.input_ids.shape[1] - video_tokens + kept
