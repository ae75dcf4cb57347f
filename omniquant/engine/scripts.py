"""Launch commands and scripts of a bundle: trtllm-serve, trtllm-bench, vLLM.

Policy: every command runs from the bundle directory and names the bundle's own
files (``checkpoint``, ``llm_api_options.yaml``), so a bundle can be moved or
copied to the GPU host as one folder. The same command strings go into the
scripts and into ``bundle.json``; scripts ``cd`` to their own folder first and pass
extra arguments through. Efficient Video Sampling is set the way each server
documents it: the ``TLLM_VIDEO_PRUNING_RATIO`` environment variable for
TensorRT-LLM (read when its model module is imported), ``--video-pruning-rate`` for
vLLM. vLLM gets the same serving choices as the options file where it has a flag
for them: float32 Mamba state, an FP8 KV cache for FP8-KV and NVFP4 checkpoints.
``eval.sh`` closes the loop: it starts one of the bundle's servers (``serve.sh``,
``vllm_serve.sh``, or ``omniquant serve`` for a CPU dry run) on loopback, waits for
``/health`` (bounded), runs ``omniquant report`` with the served model as a candidate
and stops the server on exit, whatever happened.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

CHECKPOINT_DIR = "checkpoint"
OPTIONS_FILE = "llm_api_options.yaml"
BENCH_DATASET = "bench_dataset.jsonl"
BENCH_REPORT = "bench_report.json"
EVS_ENV = "TLLM_VIDEO_PRUNING_RATIO"


@dataclass(frozen=True)
class LaunchCommands:
    """Shell commands to run from the bundle directory.

    Attributes:
        env: Environment variables every TensorRT-LLM command needs.
        serve: ``trtllm-serve`` command.
        bench_dataset: ``trtllm-bench prepare-dataset`` command (synthetic text requests).
        bench: ``trtllm-bench throughput`` command with the PyTorch backend.
        vllm_serve: Equivalent ``vllm serve`` command.
    """

    env: dict[str, str]
    serve: str
    bench_dataset: str
    bench: str
    vllm_serve: str

    def as_dict(self) -> dict[str, object]:
        return {
            "cwd": "bundle directory",
            "env": dict(self.env),
            "serve": self.serve,
            "bench_dataset": self.bench_dataset,
            "bench": self.bench,
            "vllm_serve": self.vllm_serve,
        }


def _join(*parts: object) -> str:
    return " ".join(shlex.quote(str(p)) for p in parts)


def _rate(q: float) -> str:
    return format(q, "g")


def make_commands(
    *,
    max_batch_size: int,
    max_seq_len: int,
    video_pruning_rate: float | None,
    vllm_fp8_kv_cache: bool,
) -> LaunchCommands:
    """Build the launch commands for one bundle."""
    env = {EVS_ENV: _rate(video_pruning_rate)} if video_pruning_rate is not None else {}
    serve = _join(
        "trtllm-serve", "serve", CHECKPOINT_DIR, "--trust_remote_code",
        "--extra_llm_api_options", OPTIONS_FILE,
        "--max_batch_size", max_batch_size, "--max_seq_len", max_seq_len,
    )  # fmt: skip
    # Synthetic text requests sized to fit max_seq_len: measures the language model.
    input_mean = min(1024, max_seq_len // 2)
    output_mean = min(256, max_seq_len // 4)
    bench_dataset = _join(
        "trtllm-bench", "--model", CHECKPOINT_DIR, "prepare-dataset", "--trust-remote-code",
        "--output", BENCH_DATASET, "token-norm-dist",
        "--num-requests", max(32, 4 * max_batch_size),
        "--input-mean", input_mean, "--output-mean", output_mean,
        "--input-stdev", 0, "--output-stdev", 0,
    )  # fmt: skip
    bench = _join(
        "trtllm-bench", "--model", CHECKPOINT_DIR, "--model_path", CHECKPOINT_DIR,
        "throughput", "--backend", "pytorch", "--extra_llm_api_options", OPTIONS_FILE,
        "--dataset", BENCH_DATASET, "--max_batch_size", max_batch_size,
        "--max_seq_len", max_seq_len, "--report_json", BENCH_REPORT,
    )  # fmt: skip
    vllm = [
        "vllm", "serve", CHECKPOINT_DIR, "--trust-remote-code",
        "--max-num-seqs", max_batch_size, "--max-model-len", max_seq_len,
        "--mamba-ssm-cache-dtype", "float32",
    ]  # fmt: skip
    if vllm_fp8_kv_cache:
        vllm += ["--kv-cache-dtype", "fp8"]
    if video_pruning_rate is not None:
        vllm += ["--video-pruning-rate", _rate(video_pruning_rate)]
    return LaunchCommands(
        env=env, serve=serve, bench_dataset=bench_dataset, bench=bench, vllm_serve=_join(*vllm)
    )


#: Where each serving flag comes from (written into the scripts as comments).
VLLM_FLAG_SOURCES = (
    (
        "--trust-remote-code: NVIDIA's model card and vLLM recipe for the Nano VL/Omni family (remote-code "
        "config class NemotronH_Nano_Omni_Reasoning_V3)."
    ),
    (
        "--kv-cache-dtype fp8 (FP8-KV and NVFP4 checkpoints): NVIDIA's serving commands for the quantized "
        "variants; vLLM 0.33 would also pick fp8 from config.json's kv_cache_scheme "
        "(vllm/utils/torch_utils.py:498-514), the flag makes it explicit."
    ),
    (
        "--video-pruning-rate Q: Efficient Video Sampling as NVIDIA serves it (0.5 in its commands); vLLM "
        "ignores the config's video_pruning_rate."
    ),
    (
        "--mamba-ssm-cache-dtype float32: the Mamba SSM state must stay float32 (vLLM's NemotronH default "
        "changed after accuracy reports; NVIDIA's TensorRT-LLM options set mamba_ssm_cache_dtype float32 too)."
    ),
    "--max-num-seqs / --max-model-len: this bundle's max_batch_size / max_seq_len.",
)
TRTLLM_FLAG_SOURCES = (
    (
        "trtllm-serve serve CKPT --trust_remote_code --extra_llm_api_options YAML: the PyTorch-backend "
        "command in NVIDIA's TensorRT-LLM deployment guide (no trtllm-build path exists for NemotronH)."
    ),
    (
        "TLLM_VIDEO_PRUNING_RATIO: EVS rate read at import by modeling_nemotron_nano.py in the "
        "releases this bundle targets; its newest source takes video_pruning_rate from the model config "
        "instead (NemotronH_Nano_VL_V2.__init__), so check which your TensorRT-LLM reads."
    ),
)


def _script(header: list[str], env: dict[str, str], body: list[str]) -> str:
    lines = ["#!/usr/bin/env bash", *(f"# {h}" for h in header)]
    lines += ["set -euo pipefail", 'cd "$(dirname "${BASH_SOURCE[0]}")"']
    for key, value in env.items():
        lines.append(f"export {key}={shlex.quote(value)}  # Efficient Video Sampling pruning rate")
    return "\n".join(lines + body) + "\n"


EVAL_SCRIPT = r"""
CALLER_DIR="$OLDPWD"                  # report paths are the caller's, not the bundle's
SERVER="${SERVER:-trtllm}"            # trtllm (serve.sh) | vllm (vllm_serve.sh) | omniquant (CPU emulation)
PORT="${PORT:-8000}"
HEALTH_TIMEOUT="${HEALTH_TIMEOUT:-1800}" # seconds; engines compile and capture CUDA graphs at start
NAME="${NAME:-__NAME__}"
OMNIQUANT="${OMNIQUANT:-omniquant}"   # e.g. OMNIQUANT="python -m omniquant.cli"
LOG="${LOG:-eval_server.log}"
case "$SERVER" in
  trtllm) ./serve.sh --host 127.0.0.1 --port "$PORT" >"$LOG" 2>&1 & ;;
  vllm) ./vllm_serve.sh --host 127.0.0.1 --port "$PORT" >"$LOG" 2>&1 & ;;
  omniquant) $OMNIQUANT serve checkpoint --host 127.0.0.1 --port "$PORT" >"$LOG" 2>&1 & ;;
  *) echo "eval.sh: SERVER=$SERVER: use trtllm, vllm or omniquant" >&2; exit 2 ;;
esac
SERVER_PID=$!
stop_server() { kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; }
trap stop_server EXIT
URL="http://127.0.0.1:$PORT"
echo "eval.sh: waiting for $SERVER on $URL (log: $LOG)"
python3 - "$URL/health" "$HEALTH_TIMEOUT" "$SERVER_PID" <<'PY'
import os, sys, time, urllib.request
url, deadline, pid = sys.argv[1], time.time() + float(sys.argv[2]), int(sys.argv[3])
while time.time() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("eval.sh: the server exited before it became healthy; see its log")
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(2)
sys.exit("eval.sh: the server did not become healthy in time (HEALTH_TIMEOUT)")
PY
cd "$CALLER_DIR"
$OMNIQUANT report --candidate "$NAME=$URL/v1" "$@"
"""


def render_eval_script(*, banner: str, name: str) -> str:
    """``eval.sh``: serve this bundle, report on it, stop the server (see the module policy)."""
    return _script(
        [
            (
                "Evaluate this bundle as served: start its server, wait for health, run "
                f"`omniquant report`, stop it. {banner}"
            ),
            "Usage: ./eval.sh --baseline BF16_DIR_OR_NAME=URL --tasks TASKS --out DIR [report options]",
            (
                "The served model is added as --candidate NAME=http://127.0.0.1:$PORT/v1; more "
                "--candidate options may be passed."
            ),
            "Environment: SERVER (trtllm | vllm | omniquant), PORT, HEALTH_TIMEOUT, NAME, OMNIQUANT, LOG.",
        ],
        {},
        EVAL_SCRIPT.replace("__NAME__", name).strip("\n").splitlines(),
    )


def render_scripts(commands: LaunchCommands, *, banner: str, trtllm_min: str) -> dict[str, str]:
    """Script file name -> text for ``serve.sh``, ``bench.sh`` and ``vllm_serve.sh``."""
    # bench.sh lets $DATASET replace the default dataset file in both commands.
    dataset_cmd = commands.bench_dataset.replace(BENCH_DATASET, '"$DATASET"')
    bench_cmd = commands.bench.replace(BENCH_DATASET, '"$DATASET"')
    needs = f"Needs TensorRT-LLM >= {trtllm_min} on a GPU host. Extra arguments are passed through."
    return {
        "serve.sh": _script(
            [
                f"OpenAI-compatible TensorRT-LLM server. {banner}",
                needs,
                "Flag sources:",
                *(f"  {x}" for x in TRTLLM_FLAG_SOURCES),
            ],
            commands.env,
            [f'exec {commands.serve} "$@"'],
        ),
        "bench.sh": _script(
            [
                f"TensorRT-LLM throughput benchmark (PyTorch backend). {banner}",
                needs,
                f"Uses $DATASET (absolute, or relative to this folder) if set, else writes synthetic text requests to {BENCH_DATASET}.",
            ],
            commands.env,
            [
                f'DATASET="${{DATASET:-{BENCH_DATASET}}}"',
                'if [ ! -f "$DATASET" ]; then',
                f"  {dataset_cmd}",
                "fi",
                f'exec {bench_cmd} "$@"',
            ],
        ),
        "vllm_serve.sh": _script(
            [
                f"The same checkpoint served by vLLM. {banner}",
                "Needs a vLLM with Nemotron omni support (>= 0.20).",
                "Flag sources:",
                *(f"  {x}" for x in VLLM_FLAG_SOURCES),
            ],
            {},
            [f'exec {commands.vllm_serve} "$@"'],
        ),
    }
