"""Building an engine bundle: everything a GPU host needs to bring the engine up.

Policy: NemotronH omni models have no ``trtllm-build`` path; the TensorRT-LLM
engine is the PyTorch backend loading the Hugging Face checkpoint, shaped by an
LLM API options file, with CUDA graphs captured and kernels tuned at start-up. A
bundle therefore holds:

* ``checkpoint/``: the checkpoint, copied (or symlinked with ``link``), its shards
  verified against ``omniquant.json``;
* ``llm_api_options.yaml``: options for the target and precision, validated by
  ``options.LlmApiOptions`` before it is written;
* ``serve.sh``, ``bench.sh``, ``vllm_serve.sh``: executable launch scripts;
* ``eval.sh``: serves the bundle (TensorRT-LLM, vLLM or ``omniquant serve``) and runs
  ``omniquant report`` against it;
* ``bundle.json``: target, SM, precision, checkpoint checksums, versions,
  commands, options, and whether the engine was validated.

Every check that can fail (target compatibility, arguments, output directory)
runs before anything is written. The bundle is assembled in a hidden sibling
directory and renamed into place at the end, so ``out`` is either absent, the old
bundle, or the complete new one. Building never imports ``tensorrt_llm``: the
engine warm-up and smoke test (``validate.validate_engine``) run only on a GPU
host with TensorRT-LLM installed; elsewhere ``bundle.json`` says so in ``note``.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from omniquant.checkpoint.layout import CONFIG_JSON, RECORD_JSON
from omniquant.engine.bundle_file import TENSORRT_LLM_MIN_VERSION, write_bundle_json
from omniquant.engine.checkpoint import (
    CheckpointInfo,
    place_checkpoint,
    read_checkpoint,
    serving_warnings,
)
from omniquant.engine.options import build_llm_api_options, dump_llm_api_options
from omniquant.engine.scripts import (
    CHECKPOINT_DIR,
    OPTIONS_FILE,
    make_commands,
    render_eval_script,
    render_scripts,
)
from omniquant.engine.targets import Target, get_target, nvfp4_on_hopper_message
from omniquant.errors import EngineError, arg_ref
from omniquant.outdir import ENGINE_BUNDLE, check_out, check_removable, mark_output, out_path

BUNDLE_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class BundleResult:
    """What ``build_engine_bundle`` wrote.

    Attributes:
        path: The bundle directory.
        target: ``hopper`` or ``blackwell``.
        sm: Minimum compute capability of the target.
        precision: ``bf16``, ``fp8``, ``nvfp4`` or ``mixed``.
        kv_cache_dtype: ``fp8`` or ``auto``.
        moe_backend: ``moe_config.backend`` written for the target.
        checkpoint_mode: ``copy`` or ``link``.
        options: The options YAML content.
        commands: Launch commands (also in ``bundle.json``).
        files: Top-level bundle entries.
        engine_validated: Always False here; ``validate_engine`` sets it.
        note: Why the engine is not validated and where it will be.
        warnings: Problems that will stop the engine on the GPU host (also in bundle.json).
    """

    path: Path
    target: str
    sm: int
    precision: str
    kv_cache_dtype: str
    moe_backend: str
    checkpoint_mode: str
    options: dict[str, Any]
    commands: dict[str, Any]
    files: tuple[str, ...]
    engine_validated: bool
    note: str
    warnings: tuple[str, ...] = ()


def check_compatibility(info: CheckpointInfo, target: Target) -> None:
    """Refuse precisions the target GPU cannot run.

    Raises:
        EngineError: The checkpoint has NVFP4 GEMMs and the target is not Blackwell.
    """
    if info.quant.uses_nvfp4 and not target.nvfp4:
        raise EngineError(nvfp4_on_hopper_message(str(info.path), info.quant.describe()))


#: Upper bounds of the runtime options: a larger value is a typo, and it would be written
#: into the options YAML and the launch scripts as it is.
MAX_BATCH_SIZE = 4096
MAX_SEQ_LEN = 1 << 20


def _check_args(max_batch_size: int, max_seq_len: int, rate: float | None, info: CheckpointInfo):
    # Errors name the argument (arg=): the CLI prints its flag (--max-batch-size 0: ...).
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise EngineError("must be a positive integer.", arg="max_batch_size", value=max_batch_size)
    if max_batch_size > MAX_BATCH_SIZE:
        raise EngineError(
            f"at most {MAX_BATCH_SIZE} (TensorRT-LLM's own default is 2048, and a CUDA graph "
            f"is captured per batch size up to it).",
            arg="max_batch_size",
            value=max_batch_size,
        )
    if not isinstance(max_seq_len, int) or max_seq_len < 16:
        raise EngineError("must be an integer >= 16.", arg="max_seq_len", value=max_seq_len)
    if max_seq_len > MAX_SEQ_LEN:
        raise EngineError(
            f"at most {MAX_SEQ_LEN} (2**20 tokens, the longest context Nemotron 3 Nano is "
            f"released for).",
            arg="max_seq_len",
            value=max_seq_len,
        )
    if rate is not None:
        if not 0.0 <= rate < 1.0:
            raise EngineError(
                "must be in [0, 1) (the fraction of video tokens Efficient Video Sampling "
                "drops; 0.5 halves them).",
                arg="video_pruning_rate",
                value=rate,
            )
        if not info.has_video:
            raise EngineError(
                f"{info.path / CONFIG_JSON} has no vision_config, so the model takes no "
                f"video: leave {arg_ref('video_pruning_rate')} unset.",
                arg="video_pruning_rate",
                value=rate,
            )


def tensorrt_llm_version() -> str | None:
    """Installed tensorrt-llm distribution version, read without importing it."""
    from importlib import metadata

    for dist in ("tensorrt-llm", "tensorrt_llm"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def validate_command(bundle: Path) -> str:
    """The Python call that validates ``bundle`` on a GPU host."""
    return (
        f'python -c "from omniquant.engine import validate_engine; '
        f'validate_engine({str(bundle)!r})"'
    )


def pending_note(bundle: Path) -> str:
    """``bundle.json`` ``note`` for a bundle whose engine has not been loaded yet."""
    from omniquant.engine.validate import engine_host_status

    ready, reason = engine_host_status()
    where = "this host can run it" if ready else f"not on this host ({reason})"
    return (
        f"engine not validated: the warm-up and the text/image/video/audio smoke test run "
        f"only on a GPU host with tensorrt_llm >= {TENSORRT_LLM_MIN_VERSION} installed; "
        f"{where}. There, run `omniquant build-engine` again or {validate_command(bundle)}"
    )


def _make_executable(path: Path) -> None:
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def build_engine_bundle(
    checkpoint: str | Path,
    target: Literal["hopper", "blackwell"],
    out: str | Path,
    *,
    max_batch_size: int = 8,
    max_seq_len: int = 8192,
    video_pruning_rate: float | None = None,
    link: bool = False,
    force: bool = False,
) -> BundleResult:
    """Build a TensorRT-LLM engine bundle for one GPU generation.

    Runs on any host: nothing here imports ``tensorrt_llm``. The engine itself is
    loaded, warmed up and smoke-tested by ``validate_engine`` on a GPU host with
    TensorRT-LLM installed.

    Args:
        checkpoint: Checkpoint directory (``config.json``, shards, tokenizer,
            ``hf_quant_config.json`` when quantized, ``omniquant.json``).
        target: ``hopper`` (SM90) or ``blackwell`` (SM100).
        out: Bundle directory to create.
        max_batch_size: Largest runtime batch, also the largest CUDA graph.
        max_seq_len: Longest request (prompt + output) in tokens.
        video_pruning_rate: Efficient Video Sampling rate in [0, 1), or None for off.
        link: Symlink the checkpoint instead of copying it.
        force: Replace an existing ``out``.

    Returns:
        A ``BundleResult`` describing the bundle.

    Raises:
        EngineError: Incompatible precision for the target, bad arguments, an
            existing ``out`` without ``force``, or a shard checksum mismatch.
    """
    from omniquant import __version__
    from omniquant.checkpoint.verify import verify_checkpoint

    spec = get_target(target)
    # Shards are hashed against omniquant.json by place_checkpoint while it copies them.
    verify_checkpoint(checkpoint, flag=arg_ref("checkpoint"), error=EngineError, checksums=False)
    info = read_checkpoint(checkpoint)
    check_compatibility(info, spec)
    _check_args(max_batch_size, max_seq_len, video_pruning_rate, info)
    out = out_path(out, EngineError).absolute()
    check_out(
        out, force=force, error=EngineError, spares=((info.path, "checkpoint"),), nested=True,
        kind=ENGINE_BUNDLE,
    )  # fmt: skip

    options = build_llm_api_options(
        kv_cache_dtype=info.quant.kv_cache_dtype,
        moe_backend=spec.moe_backend,
        max_batch_size=max_batch_size,
        max_seq_len=max_seq_len,
        video=info.has_video,
        source=out / OPTIONS_FILE,
    )
    commands = make_commands(
        max_batch_size=max_batch_size,
        max_seq_len=max_seq_len,
        video_pruning_rate=video_pruning_rate,
        vllm_fp8_kv_cache=info.quant.kv_cache_dtype == "fp8" or info.quant.uses_nvfp4,
    )
    banner = (
        f"Generated by omniquant {__version__} for {spec.name} (SM{spec.sm}), "
        f"precision {info.quant.precision}."
    )
    scripts = render_scripts(commands, banner=banner, trtllm_min=TENSORRT_LLM_MIN_VERSION)
    served_name = re.sub(r"[^a-z0-9_.+-]+", "-", info.quant.precision.lower()).strip("-")
    scripts["eval.sh"] = render_eval_script(banner=banner, name=served_name or "served")
    note = pending_note(out)
    warnings = serving_warnings(info)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.building-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        checksums = place_checkpoint(info, staging / CHECKPOINT_DIR, link=link)
        (staging / OPTIONS_FILE).write_text(
            f"# TensorRT-LLM LLM API options (extra_llm_api_options). {banner}\n"
            + dump_llm_api_options(options)
        )
        for name, text in scripts.items():
            (staging / name).write_text(text)
            _make_executable(staging / name)
        quant = info.quant
        manifest = {
            "schema_version": BUNDLE_SCHEMA_VERSION,
            "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "target": spec.name,
            "sm": spec.sm,
            "precision": quant.precision,
            "quantization": {
                "quant_algo": quant.quant_algo,
                "kv_cache_quant_algo": quant.kv_cache_quant_algo,
                "kv_cache_dtype": quant.kv_cache_dtype,
                "group_size": quant.group_size,
                "layer_algos": quant.layer_algos,
                "nvfp4_layers": len(quant.nvfp4_layers),
            },
            "model": {
                "model_type": info.model_type,
                "architectures": info.architectures,
                "modalities": list(info.modalities),
            },
            "checkpoint": {
                "path": CHECKPOINT_DIR,
                "source": str(info.path),
                "mode": "link" if link else "copy",
                "verified_against": RECORD_JSON if info.expected_sha256 else None,
                "shards": {name: checksums[name] for name in info.shards},
                "sha256": checksums,
                "recipe": info.recipe,
            },
            "versions": {
                "omniquant": __version__,
                "tensorrt_llm_min": TENSORRT_LLM_MIN_VERSION,
                "tensorrt_llm_installed": tensorrt_llm_version(),
                "checkpoint_producer": quant.producer,
            },
            "options_file": OPTIONS_FILE,
            "options": options.to_dict(),
            "video_pruning_rate": video_pruning_rate,
            "commands": {**commands.as_dict(), "validate": validate_command(out)},
            "scripts": sorted(scripts),
            "engine_validated": False,
            "note": note,
            "warnings": warnings,
            "validation": None,
        }
        write_bundle_json(staging, manifest)
        files = tuple(sorted(p.name for p in staging.iterdir()))
        mark_output(staging, ENGINE_BUNDLE)
        if out.exists() or out.is_symlink():
            check_removable(out, ENGINE_BUNDLE, EngineError)  # again: it may have changed
            old = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(staging, out)
            _remove(old)
        else:
            os.replace(staging, out)
    except BaseException:
        _remove(staging)
        raise

    return BundleResult(
        path=out,
        target=spec.name,
        sm=spec.sm,
        precision=info.quant.precision,
        kv_cache_dtype=info.quant.kv_cache_dtype,
        moe_backend=spec.moe_backend,
        checkpoint_mode="link" if link else "copy",
        options=options.to_dict(),
        commands=manifest["commands"],
        files=files,
        engine_validated=False,
        note=note,
        warnings=tuple(warnings),
    )
