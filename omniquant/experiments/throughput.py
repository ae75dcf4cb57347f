"""The report's load phase: each model served, measured under one workload, priced.

``measure_throughput`` runs after the quality phase (``build_report``). For each model,
in report order, it serves it (a URL as given; a local checkpoint through
``omniquant serve`` started on a free port and stopped after,
``omniquant.endpoint.launch``), runs ``omniquant.endpoint.load.run_load`` and adds:

- where the figures came from: the server (``/v1/models``' ``owned_by``; ``omniquant
  serve`` is marked as CPU emulation of the serving numerics, not serving performance)
  and the machine (``machine`` as stated, or this machine's CPU for a server the report
  started; "not stated" otherwise);
- with ``gpu_hour_price``: cost per hour of media = price x ``gpus`` / hours of media
  per hour, per modality and level (``None`` where that modality was not sent or the
  level is not available);
- capacity by arithmetic (``omniquant.quantize.serving_memory``): concurrent sequences
  of the workload's length (the longest measured prompt + ``max_tokens``) that fit in
  ``gpu_memory`` beside the weights, kept apart from the measured block.

Models are measured one after another, never at the same time, with the same
workload and levels; a model whose server fails gets ``None`` figures and the reason.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from omniquant.endpoint.load import Workload

EMULATION_NOTE = "CPU emulation of the serving numerics, not serving performance"


def local_machine() -> str:
    """This machine in words: CPU model, logical CPUs, OS."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} ({platform.node()})"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:60] or "model"


def _server_of(entry: dict) -> tuple[str, bool]:
    if isinstance(entry.get("omniquant"), dict) or entry.get("owned_by") == "omniquant":
        return f"omniquant serve ({EMULATION_NOTE})", True
    return f"{entry.get('owned_by') or 'unknown'} server (owned_by in /v1/models)", False


def _cost(levels: list[dict], price: float | None, gpus: int) -> None:
    for level in levels:
        rates = level.get("media_hours_per_hour")
        level["cost_per_media_hour"] = (
            None
            if price is None or rates is None
            else {k: (price * gpus / v if v else None) for k, v in rates.items()}
        )


def _capacity(info: dict, checkpoint: Path | None, result: dict, workload: Workload,
              gpu_bytes: int) -> dict:  # fmt: skip
    from omniquant.quantize.serving_memory import concurrent_sequences

    prompts = [lv.get("max_prompt_tokens") for lv in result["levels"]]
    prompts = [p for p in prompts if p is not None]
    if checkpoint is None or not (checkpoint / "config.json").is_file():
        return {"kind": "arithmetic", "sequences": None,
                "not_available": "the model's config.json is not on this machine"}  # fmt: skip
    if info.get("size_bytes") is None:
        return {"kind": "arithmetic", "sequences": None,
                "not_available": "the checkpoint's size is not known"}  # fmt: skip
    if not prompts:
        return {"kind": "arithmetic", "sequences": None,
                "not_available": "no measured prompt length (no usage from the server)"}  # fmt: skip
    tokens = max(prompts) + workload.max_tokens
    try:
        return concurrent_sequences(
            checkpoint, tokens, info.get("kv_cache"), int(info["size_bytes"]), gpu_bytes
        )
    except ValueError as err:
        return {"kind": "arithmetic", "sequences": None, "not_available": str(err)}


def _records_file(out: Path, name: str, result: dict) -> str:
    """Per-request records of every level as JSON Lines beside the report; the report
    keeps the path, not the rows."""
    import json

    file = out / f"{_slug(name)}.jsonl"
    file.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"concurrency": level["concurrency"], **row}) + "\n"
        for level in result["levels"]
        for row in level.pop("records", [])
    ]
    file.write_text("".join(lines))
    return str(file)


def measure_throughput(
    sources: list,
    infos: list[dict],
    workload: Workload,
    out: Path,
    *,
    machine: str | None = None,
    gpu_hour_price: float | None = None,
    gpus: int = 1,
    gpu_memory_bytes: int = 80 * 2**30,
    timeout: float = 300.0,
    request_extra: dict | None = None,
    aiperf: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Measure every model under ``workload``; returns ``{name: throughput block}``.

    Args:
        sources: ``ModelSource`` of each model (report order: baseline first).
        infos: The models' descriptions (``name``, ``size_bytes``, ``kv_cache``, ``path``).
        workload: What to send (``omniquant.endpoint.load``).
        out: Directory for the servers' logs and the per-request records.
        machine: The servers' machine in words (URLs); a server the report starts runs
            on this machine, which is described instead.
        gpu_hour_price: Price of one GPU-hour (``None``: no cost).
        gpus: GPUs the served model occupies (the price is per GPU).
        gpu_memory_bytes: Memory of the GPUs the capacity arithmetic fills.
        timeout: Seconds per request (a slower answer is an error of its level).
        request_extra: Fields merged into every request.
        aiperf: The aiperf program to drive the levels (``None``: the built-in client).
        log: Receives progress lines.
    """
    from omniquant.endpoint.client import EndpointClient
    from omniquant.endpoint.launch import launched_server
    from omniquant.endpoint.load import run_load
    from omniquant.endpoint.protocol import ModelSource
    from omniquant.errors import EndpointError

    say = log or (lambda _m: None)
    here = local_machine()
    generator = "omniquant httpx client (omniquant.endpoint.load)"
    if aiperf is not None:
        from omniquant.endpoint.aiperf import aiperf_version

        generator = f"aiperf {aiperf_version(aiperf)} (raw-payload replay, {aiperf})"
    blocks: dict[str, dict] = {}
    for src, info in zip(sources, infos):
        name = info["name"]
        started = not src.is_endpoint
        server = (launched_server(src.path, _slug(name), out / f"serve-{_slug(name)}.log")
                  if started else nullcontext(src.url))  # fmt: skip
        say(f"load {name}: {'starting omniquant serve for ' + str(src.path) if started else src.url}")
        block: dict = {"machine": here if started else (machine or "not stated (pass --machine)"),
                       "load_generator": generator}  # fmt: skip
        try:
            with server as url:
                client = EndpointClient(
                    ModelSource(name=name, url=url, model=None if started else src.model),
                    timeout=timeout, retries=0, concurrency=max(workload.concurrency),
                    request_extra=request_extra,
                )  # fmt: skip
                try:
                    entry = client.resolve_model()
                    block["server"], block["emulation"] = _server_of(entry)
                    block["url"] = url
                    result = run_load(client, workload, log=say,
                                      level_runner=_aiperf_runner(aiperf, out, name, src, entry))  # fmt: skip
                finally:
                    client.close()
        except EndpointError as err:
            result = {"levels": [], "error": f"{err}; no figure is reported"}
            block.setdefault("server", "not reached")
        if result.get("error"):
            say(f"load {name}: n/a ({result['error']})")
        _cost(result["levels"], gpu_hour_price, gpus)
        block.update(result)
        block["records"] = _records_file(out, name, block)
        root = src.path if started else _served_root(info)
        block["capacity"] = _capacity(info, Path(root) if root else None, block, workload,
                                      gpu_memory_bytes)  # fmt: skip
        blocks[name] = block
    return blocks


def _aiperf_runner(program: str | None, out: Path, name: str, src, entry: dict):
    if program is None:
        return None
    from omniquant.endpoint.aiperf import aiperf_level_runner

    # aiperf loads a tokenizer even when the server's usage is counted: the local
    # checkpoint when there is one, else the served model's name (a hub id).
    root = str(src.path) if src.path else entry.get("root")
    tokenizer = root if root and Path(root).is_dir() else entry.get("id")
    return aiperf_level_runner(program, out / f"aiperf-{_slug(name)}", tokenizer)


def _served_root(info: dict) -> str | None:
    root = (info.get("endpoint") or {}).get("root")
    return root if isinstance(root, str) and Path(root).is_dir() else None
