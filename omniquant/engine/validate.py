"""Engine warm-up and smoke test through TensorRT-LLM's LLM API.

Policy: this step runs ONLY on a GPU host with ``tensorrt_llm`` (>= 1.3.0rc13)
installed; ``tensorrt_llm`` is imported inside ``validate_engine`` and nowhere
else in omniquant. Everything before it (``build_engine_bundle``) runs anywhere.

``validate_engine`` loads the bundle exactly as the launch scripts do:
``tensorrt_llm.LLM(model=<bundle>/checkpoint, trust_remote_code=True, **options)``
with the options read back from the bundle's YAML and validated by the same
schema that wrote them, and ``TLLM_VIDEO_PRUNING_RATIO`` set from ``bundle.json``
before ``tensorrt_llm`` is imported (TensorRT-LLM reads it at import). Loading
captures the CUDA graphs and tunes the kernels; one short text generation then
warms the engine up. The smoke test sends one text prompt and one prompt per
input modality the checkpoint declares (image, video, audio), the multimodal ones
built with ``tensorrt_llm.inputs.default_multimodal_input_loader`` as the LLM API
documents for multimodal models. Media come from the caller or are synthesised
into ``<bundle>/smoke/`` (a PNG, an MP4 and a WAV). Outputs, token counts and
timings are recorded under ``validation`` in ``bundle.json``; the engine counts as
validated when every prompt produced at least one token. A load or generation
failure is recorded there too and raised as ``EngineError``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from omniquant.engine.bundle_file import (
    TENSORRT_LLM_MIN_VERSION,
    read_bundle_json,
    write_bundle_json,
)
from omniquant.engine.options import load_llm_api_options
from omniquant.engine.scripts import CHECKPOINT_DIR, EVS_ENV, OPTIONS_FILE
from omniquant.errors import EngineError

SMOKE_PROMPTS: dict[str, str] = {
    "text": "Name the three primary colours of light in one sentence.",
    "image": "Describe the image in one sentence.",
    "video": "What moves in the video, and in which direction? Answer in one sentence.",
    "audio": "Describe the sound in one sentence.",
}
WARMUP_PROMPT = "Hello."
MEDIA_MODALITIES = ("image", "video", "audio")
# Frames sampled from the smoke video; a multiple of the 2-frame Conv3D tubelet.
SMOKE_NUM_FRAMES = 8


@dataclass
class SmokeResult:
    """One smoke-test prompt and what the engine answered."""

    modality: str
    prompt: str
    media: str | None
    output_text: str
    output_tokens: int
    latency_s: float

    @property
    def ok(self) -> bool:
        return self.output_tokens > 0


@dataclass
class ValidationReport:
    """What ``validate_engine`` measured (also written to ``bundle.json``)."""

    engine_validated: bool
    device: str
    sm: int
    tensorrt_llm_version: str
    video_pruning_ratio_env: str | None
    load_s: float
    warmup_s: float
    smoke: list[SmokeResult] = field(default_factory=list)
    validated_utc: str = ""

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for entry, result in zip(data["smoke"], self.smoke):
            entry["ok"] = result.ok
        return data


def _tensorrt_llm_importable() -> bool:
    if "tensorrt_llm" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("tensorrt_llm") is not None
    except (ImportError, ValueError):
        return False


def _cuda_device() -> tuple[str, int] | None:
    """(name, SM as an integer) of GPU 0, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return torch.cuda.get_device_name(0), major * 10 + minor


def engine_host_status() -> tuple[bool, str]:
    """Whether this host can load an engine, and why not (or which GPU it has)."""
    if not _tensorrt_llm_importable():
        return False, "tensorrt_llm is not installed"
    device = _cuda_device()
    if device is None:
        return False, "no CUDA GPU is visible"
    return True, f"{device[0]} (SM{device[1]})"


def write_smoke_media(
    directory: Path, modalities: tuple[str, ...] = MEDIA_MODALITIES
) -> dict[str, Path]:
    """Synthesise small smoke-test media: a PNG, an 8 fps MP4 and a 16 kHz WAV.

    Uses Pillow, PyAV (MPEG-4 Part 2 in MP4, as OpenCV's mp4v writes) and soundfile, all
    dependencies of omniquant.

    Raises:
        EngineError: A needed library is missing.
    """
    import numpy as np

    directory.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    size = 448
    yy, xx = np.mgrid[0:size, 0:size]
    try:
        if "image" in modalities:
            from PIL import Image

            img = np.zeros((size, size, 3), np.uint8)
            img[...] = (30, 60, 200)
            img[(yy - size // 2) ** 2 + (xx - size // 2) ** 2 < (size // 4) ** 2] = (220, 30, 30)
            paths["image"] = directory / "smoke.png"
            Image.fromarray(img).save(paths["image"])
        if "video" in modalities:
            import av

            paths["video"] = directory / "smoke.mp4"
            with av.open(str(paths["video"]), "w") as container:
                stream = container.add_stream("mpeg4", rate=8)
                stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
                for i in range(32):  # a square crossing the frame left to right in 4 s
                    frame = np.full((size, size, 3), 40, np.uint8)
                    x0 = int(i * (size - 96) / 31)
                    frame[176:272, x0 : x0 + 96] = (0, 220, 0)
                    for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)
        if "audio" in modalities:
            import soundfile

            rate, seconds = 16000, 2.0
            t = np.arange(int(rate * seconds)) / rate
            tone = 0.3 * np.sin(2 * math.pi * 440.0 * t).astype(np.float32)
            paths["audio"] = directory / "smoke.wav"
            soundfile.write(paths["audio"], tone, rate)
    except ImportError as exc:
        raise EngineError(
            f"cannot synthesise smoke-test media ({exc}); install Pillow, av "
            f"and soundfile, or pass media={{'image': ..., 'video': ..., 'audio': ...}}"
        ) from None
    return paths


def _check_version(version: str) -> None:
    from packaging.version import InvalidVersion, Version

    try:
        too_old = Version(version) < Version(TENSORRT_LLM_MIN_VERSION)
    except InvalidVersion:
        return
    if too_old:
        raise EngineError(
            f"tensorrt_llm {version} is installed; Nemotron omni models need >= "
            f"{TENSORRT_LLM_MIN_VERSION} (older releases fail with 'Unknown architecture'): "
            f'pip install --extra-index-url https://pypi.nvidia.com "tensorrt-llm>={TENSORRT_LLM_MIN_VERSION}"'
        )


def _generate(llm, inputs, sampling_params) -> tuple[str, int, float]:
    start = time.perf_counter()
    outputs = llm.generate(inputs, sampling_params)
    elapsed = time.perf_counter() - start
    completion = outputs[0].outputs[0]
    return completion.text, len(completion.token_ids), elapsed


#: Compute capabilities TensorRT-LLM's TRTLLM-gen MoE kernels are built for.
TRTLLM_GEN_SMS = (100, 103)


def validate_engine(
    bundle_dir: str | Path,
    *,
    media: Mapping[str, str | Path] | None = None,
    max_tokens: int = 32,
) -> ValidationReport:
    """Load the bundle's engine, warm it up, smoke-test it and record the results.

    Runs only on a GPU host with ``tensorrt_llm`` >= 1.3.0rc13 installed.

    Args:
        bundle_dir: A directory written by ``build_engine_bundle``.
        media: Optional ``{"image"|"video"|"audio": path}``; missing ones are synthesised.
        max_tokens: Tokens generated per smoke prompt (greedy).

    Returns:
        The ``ValidationReport`` also written under ``validation`` in ``bundle.json``.

    Raises:
        EngineError: No tensorrt_llm or GPU, a GPU older than the target, a bad
            options file, or the engine failed to load or generate.
    """
    bundle = Path(bundle_dir).expanduser().absolute()
    manifest = read_bundle_json(bundle)
    options = load_llm_api_options(bundle / OPTIONS_FILE).to_dict()
    checkpoint = bundle / CHECKPOINT_DIR
    if not (checkpoint / "config.json").exists():
        raise EngineError(f"{checkpoint / 'config.json'}: missing; rebuild the bundle")

    if not _tensorrt_llm_importable():
        raise EngineError(
            "tensorrt_llm is not installed: the engine warm-up runs only on a GPU host with "
            "TensorRT-LLM; install it there with pip install --extra-index-url "
            'https://pypi.nvidia.com "omniquant[trtllm]"'
        )
    device = _cuda_device()
    if device is None:
        raise EngineError("no CUDA GPU is visible: the engine warm-up runs only on a GPU host")
    device_name, sm = device
    if sm < manifest["sm"]:
        raise EngineError(
            f"{bundle / 'bundle.json'}: bundle targets {manifest['target']} (SM{manifest['sm']}), "
            f"but this GPU is {device_name} (SM{sm}); build a bundle for this GPU's generation"
        )
    moe_backend = (options.get("moe_config") or {}).get("backend")
    if moe_backend == "TRTLLM" and sm not in TRTLLM_GEN_SMS:
        raise EngineError(
            f"{bundle / OPTIONS_FILE}: moe_config.backend TRTLLM uses TensorRT-LLM's TRTLLM-gen "
            f"kernels, built for SM100/SM103 only, and this GPU is {device_name} (SM{sm}); set "
            "moe_config.backend: CUTLASS in that file for this GPU"
        )

    rate = manifest.get("video_pruning_rate")
    if rate is not None:
        # Must precede the import: TensorRT-LLM reads the ratio when its model module loads.
        os.environ[EVS_ENV] = format(rate, "g")

    import tensorrt_llm
    from tensorrt_llm import LLM, SamplingParams
    from tensorrt_llm.inputs import default_multimodal_input_loader

    version = str(getattr(tensorrt_llm, "__version__", "unknown"))
    _check_version(version)

    modalities = tuple(m for m in manifest["model"]["modalities"] if m in MEDIA_MODALITIES)
    unknown = sorted(set(media or {}) - set(MEDIA_MODALITIES))
    if unknown:
        raise EngineError(
            f"media key {unknown[0]!r} is not a smoke-test modality; use {', '.join(MEDIA_MODALITIES)}"
        )
    given = {k: Path(v) for k, v in (media or {}).items() if k in modalities}
    for kind, path in given.items():
        if not path.is_file():
            raise EngineError(f"{path}: smoke-test {kind} file not found")
    missing = tuple(m for m in modalities if m not in given)
    smoke_media = {**write_smoke_media(bundle / "smoke", missing), **given} if missing else given

    report = ValidationReport(
        engine_validated=False,
        device=device_name,
        sm=sm,
        tensorrt_llm_version=version,
        video_pruning_ratio_env=os.environ.get(EVS_ENV),
        load_s=0.0,
        warmup_s=0.0,
    )
    llm = None
    try:
        start = time.perf_counter()
        llm = LLM(model=str(checkpoint), trust_remote_code=True, **options)
        report.load_s = time.perf_counter() - start
        sampling = SamplingParams(max_tokens=max_tokens)
        _, _, report.warmup_s = _generate(llm, [WARMUP_PROMPT], sampling)

        text, tokens, latency = _generate(llm, [SMOKE_PROMPTS["text"]], sampling)
        report.smoke.append(SmokeResult("text", SMOKE_PROMPTS["text"], None, text, tokens, latency))
        for kind in modalities:
            inputs = default_multimodal_input_loader(
                tokenizer=llm.tokenizer,
                model_dir=str(checkpoint),
                model_type=manifest["model"]["model_type"],
                modality=kind,
                prompts=[SMOKE_PROMPTS[kind]],
                media=[str(smoke_media[kind])],
                image_data_format="pt",
                num_frames=SMOKE_NUM_FRAMES,
                device="cuda",
            )
            text, tokens, latency = _generate(llm, inputs, sampling)
            report.smoke.append(
                SmokeResult(
                    kind, SMOKE_PROMPTS[kind], str(smoke_media[kind]), text, tokens, latency
                )
            )
    except Exception as exc:
        manifest["validation"] = {**report.as_dict(), "error": f"{type(exc).__name__}: {exc}"}
        manifest["engine_validated"] = False
        write_bundle_json(bundle, manifest)
        raise EngineError(
            f"{bundle}: the engine failed on {device_name} with tensorrt_llm {version}: "
            f"{type(exc).__name__}: {exc} (details recorded in bundle.json 'validation')"
        ) from exc
    finally:
        if llm is not None:
            llm.shutdown()

    report.engine_validated = all(r.ok for r in report.smoke)
    report.validated_utc = datetime.now(UTC).isoformat(timespec="seconds")
    manifest["engine_validated"] = report.engine_validated
    manifest["note"] = (
        f"engine loaded and smoke-tested on {device_name} (SM{sm}) with tensorrt_llm {version}"
        if report.engine_validated
        else "engine loaded, but some smoke prompts produced no tokens; see 'validation'"
    )
    manifest["validation"] = report.as_dict()
    manifest.setdefault("versions", {})["tensorrt_llm_installed"] = version
    write_bundle_json(bundle, manifest)
    return report
