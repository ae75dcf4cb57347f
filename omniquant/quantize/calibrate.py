"""Calibration: drive the whole omni model over samples while modelopt quantizes the backbone.

Policy:
- The quantizer never sees a data loader, only ``forward_loop(model)``
  (modelopt's seam). The loop runs the *whole* omni model per sample so the
  backbone is calibrated on real image/video/audio embeddings.
- Statistics are measured, not inferred: tokens reaching the backbone are counted
  at the language model's input (after EVS), and expert token counts are read
  from the routers' own top-k choices. Where the hooks go is the adapter's to say
  (``backbone_inputs``, ``moe_layers``, ``expert_probes``); this module only counts.
- Inputs go where the first layer executes (``omniquant.devices.input_device``); a
  model split by accelerate moves activations between devices itself.
- Expert coverage is a policy: ``error`` (default) fails naming layers and
  experts below ``min_tokens``; ``force_all_experts`` additionally runs every
  calibration token through every expert with zero routing weight, for statistics
  only, so every per-expert quantizer is calibrated and outputs do not change.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from omniquant.data.batch import Sample
from omniquant.errors import CalibrationError

MODALITIES = ("text", "image", "video", "audio")


@dataclass
class CalibrationStats:
    """What reached the backbone during calibration."""

    samples: int = 0
    tokens_by_modality: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MODALITIES, 0))
    evs_rate: float = 0.0
    video_tokens_before_evs: int = 0
    video_tokens_after_evs: int = 0
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)
    #: layer -> projection -> per-expert max |input| seen by that expert's GEMM
    #: (0 where the expert saw no activation at all).
    expert_input_amax: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    force_all_experts: bool = False
    seconds: float = 0.0
    #: What ran, for messages (not in ``to_json``): one ``(id, line or 0, tokens)`` per sample.
    ran: list[tuple[str, int, int]] = field(default_factory=list)

    def describe_samples(self, at_most: int = 8) -> str:
        """``"2 samples: 'a' (line 1, 40 tokens), 'b' (line 2, 37 tokens)"``."""
        parts = [
            f"{sid!r} ({f'line {line}, ' if line else ''}{tokens:,} tokens)"
            for sid, line, tokens in self.ran[:at_most]
        ]
        more = f", and {len(self.ran) - at_most} more" if len(self.ran) > at_most else ""
        return f"{len(self.ran)} sample(s): {', '.join(parts)}{more}"

    def experts_without_activations(self) -> int:
        """Expert GEMMs (layer x projection x expert) that never saw an input."""
        return sum(v == 0 for per in self.expert_input_amax.values() for vals in per.values() for v in vals)

    def to_json(self) -> dict:
        return {
            "samples": self.samples,
            "tokens_by_modality": dict(self.tokens_by_modality),
            "evs": {
                "pruning_rate": self.evs_rate,
                "video_tokens_before": self.video_tokens_before_evs,
                "video_tokens_after": self.video_tokens_after_evs,
            },
            "expert_tokens": {k: list(v) for k, v in self.expert_tokens.items()},
            "experts_without_activations": self.experts_without_activations(),
            "force_all_experts": self.force_all_experts,
            "seconds": round(self.seconds, 3),
        }


class _Probe:
    """Hooks that measure tokens per modality and per expert (placed by the adapter)."""

    def __init__(self, loaded, force_all_experts: bool):
        self.loaded = loaded
        self.model = loaded.model
        self.force = force_all_experts
        self.seq_len_at_backbone = 0
        self.expert_tokens: dict[str, torch.Tensor] = {}
        self.expert_input_amax: dict[str, dict[str, torch.Tensor]] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        adapter = self.loaded.adapter
        for layer in adapter.moe_layers(self.model):
            self.expert_tokens[layer.name] = torch.zeros(layer.num_experts, dtype=torch.long)
            self.expert_input_amax[layer.name] = {
                p: torch.zeros(layer.num_experts) for p in layer.projections
            }
        with contextlib.ExitStack() as stack:
            stack.enter_context(adapter.backbone_inputs(self.model, self._at_backbone))
            stack.enter_context(
                adapter.expert_probes(self.model, self._routed, self._observe, self.force)
            )
            self._stack = stack.pop_all()
        return self

    def _at_backbone(self, embeds) -> None:
        self.seq_len_at_backbone = int(embeds.shape[1]) if embeds is not None else 0

    def _routed(self, layer: str, topk_indices: torch.Tensor) -> None:
        counts = torch.bincount(topk_indices.reshape(-1), minlength=self.expert_tokens[layer].numel())
        self.expert_tokens[layer] += counts.cpu()

    def _observe(self, layer: str, proj: str, idx: int, x: torch.Tensor) -> torch.Tensor:
        amax = self.expert_input_amax[layer]
        if x.numel():
            amax[proj][idx] = max(float(amax[proj][idx]), float(x.detach().abs().max()))
        return x

    def __exit__(self, *exc):
        self._stack.close()


def run_calibration(
    loaded,
    samples: list[Sample],
    quantize_fn: Callable[[Callable], None] | None,
    *,
    evs_rate: float | None = None,
    force_all_experts: bool = False,
    progress: Callable[[int, int, dict], None] | None = None,
) -> CalibrationStats:
    """Run ``samples`` through the whole model inside ``quantize_fn(forward_loop)``.

    Args:
        loaded: The ``LoadedModel``.
        samples: Calibration samples (batch size 1 each).
        quantize_fn: Receives ``forward_loop`` and must call it (e.g. a closure over
            ``mtq.quantize``). ``None`` runs the loop directly (statistics only).
        evs_rate: EVS pruning rate during calibration; ``None`` keeps the model config's.
        force_all_experts: See module docstring.
        progress: Called after each sample with ``(done, total, tokens_by_modality)``.
    """
    model, adapter = loaded.model, loaded.adapter
    stats = CalibrationStats(force_all_experts=force_all_experts)
    rate = adapter.evs_rate(model) if evs_rate is None else float(evs_rate)
    stats.evs_rate = float(rate)
    ph = adapter.placeholder_ids(model)
    from omniquant.devices import input_device

    device = input_device(model)
    t0 = time.perf_counter()

    def forward_loop(_quant_root=None) -> None:
        # modelopt may call the loop more than once (e.g. mse); count only the first pass.
        first = stats.samples == 0
        with _Probe(loaded, force_all_experts) as probe, torch.no_grad(), adapter.video_pruning(model, rate):
            for i, sample in enumerate(samples):
                adapter.forward(model, _to_device(sample, device))
                if first:
                    _count(stats, sample, probe.seq_len_at_backbone, ph)
                    stats.samples += 1
                    line = sample.meta.get("line", 0)
                    stats.ran.append((sample.id, line, int(sample.input_ids.numel())))
                    if progress:
                        progress(i + 1, len(samples), stats.tokens_by_modality)
            if first:
                stats.expert_tokens = {k: v.tolist() for k, v in probe.expert_tokens.items()}
                stats.expert_input_amax = {
                    layer: {p: t.tolist() for p, t in per.items()}
                    for layer, per in probe.expert_input_amax.items()
                }

    if quantize_fn is None:
        forward_loop()
    else:
        quantize_fn(forward_loop)
    stats.seconds = time.perf_counter() - t0
    return stats


def _to_device(sample: Sample, device: str) -> Sample:
    """``sample`` with its tensors on ``device`` (the same object on the CPU)."""
    if device == "cpu":
        return sample
    import dataclasses

    moved = {
        f.name: getattr(sample, f.name).to(device)
        for f in dataclasses.fields(sample)
        if isinstance(getattr(sample, f.name), torch.Tensor)
    }
    return dataclasses.replace(sample, **moved)


def _count(stats: CalibrationStats, sample: Sample, seq_after: int, ph: dict[str, int]) -> None:
    ids = sample.input_ids
    n_total = int(ids.numel())
    n_img_ph = int((ids == ph["image"]).sum())
    n_audio = int((ids == ph["audio"]).sum()) if sample.input_features is not None else 0
    if sample.pixel_values_videos is not None:
        video_before, n_image = n_img_ph, 0
        video_after = seq_after - (n_total - video_before)
    else:
        video_before = video_after = 0
        n_image = n_img_ph if sample.pixel_values is not None else 0
    t = stats.tokens_by_modality
    t["text"] += n_total - n_img_ph - n_audio
    t["image"] += n_image
    t["video"] += video_after
    t["audio"] += n_audio
    stats.video_tokens_before_evs += video_before
    stats.video_tokens_after_evs += video_after


def check_expert_coverage(stats: CalibrationStats, policy: str, min_tokens: int) -> list[str]:
    """Apply the coverage policy; returns warning lines (policy ``warn``).

    Raises:
        CalibrationError: policy ``error`` and some expert got fewer than ``min_tokens``.
    """
    starved = []
    for layer, counts in stats.expert_tokens.items():
        low = [i for i, c in enumerate(counts) if c < min_tokens]
        if low:
            starved.append(f"{layer}: experts {', '.join(map(str, low))}")
    if not starved or policy == "force_all_experts":
        return []
    msg = (
        f"{len(starved)} MoE layer(s) have experts that received fewer than {min_tokens} "
        "calibration token(s):\n  " + "\n  ".join(starved)
    )
    if policy == "error":
        raise CalibrationError(
            msg + f"\nCalibration ran on {stats.describe_samples()}."
            "\nTheir input scales would be guessed, not measured. Use more or more diverse "
            "calibration data (--calib, calibration.size), or set "
            "calibration.expert_coverage.policy=force_all_experts to calibrate every expert on "
            "every token (statistics only; outputs are unchanged)."
        )
    return [msg]


def iter_progress(quiet: bool) -> Callable[[int, int, dict], None] | None:
    """A progress callback showing samples/s and tokens per modality (None if quiet).

    On a terminal it redraws one line; otherwise (CI logs) it prints a line at
    every quarter so logs stay readable.
    """
    if quiet:
        return None
    import sys

    tty = sys.stderr.isatty()
    start = time.perf_counter()
    last_quarter = [0]

    def cb(done: int, total: int, tokens: dict) -> None:
        rate = done / max(time.perf_counter() - start, 1e-9)
        toks = " ".join(f"{k}={v}" for k, v in tokens.items())
        line = f"calibrating {done}/{total}  {rate:.1f} samples/s  tokens: {toks}"
        if tty:
            sys.stderr.write("\r\x1b[2K" + line + ("\n" if done == total else ""))
            sys.stderr.flush()
        elif (4 * done) // total > last_quarter[0]:
            last_quarter[0] = (4 * done) // total
            print(line, file=sys.stderr)

    return cb
