"""The one in-memory form of a model input sample, shared by every data source.

Policy: a ``Sample`` holds exactly what the omni model's forward takes for one
prompt (batch size 1), already tokenized, with placeholder runs of the right
length. Video placeholders use the *image* token id, because transformers'
``nemotron_h_omni`` scatters video features into image-token positions (its
processor expands ``<video>`` into ``<img><image>...</img>`` chunks). One sample
carries either images or a video, never both (the model cannot tell them apart
in the sequence); audio may accompany either.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Sample:
    """One tokenized multimodal prompt.

    Attributes:
        id: Stable sample id (from the manifest line or generator).
        input_ids: ``(1, L)`` token ids including placeholder runs.
        pixel_values: ``(total_patches, 3 * patch**2)`` flattened image patches.
        image_grid_hw: ``(num_images, 2)`` patch grid of each image.
        pixel_values_videos: ``(num_frames, 3, H, W)`` normalized frames; the frame
            count is a multiple of the temporal patch size (2).
        input_features: ``(num_clips, num_frames, num_mel_bins)`` Parakeet mel features.
        input_features_mask: ``(num_clips, num_frames)`` real-frame mask.
        answer_ids: ``(1, A)`` reference answer tokens, if the sample has an answer.
        meta: Free-form provenance (source paths, task name, ...).
    """

    id: str
    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_hw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    input_features: torch.Tensor | None = None
    input_features_mask: torch.Tensor | None = None
    answer_ids: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modalities present, in the fixed order text, image, video, audio."""
        present = ["text"]
        if self.pixel_values is not None:
            present.append("image")
        if self.pixel_values_videos is not None:
            present.append("video")
        if self.input_features is not None:
            present.append("audio")
        return tuple(present)
