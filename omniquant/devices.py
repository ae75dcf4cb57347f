"""Where the model lives while it is quantized: the CPU, one GPU, several GPUs, offload.

Policy:
- ``--device`` is ``cpu``, ``cuda``, ``cuda:N`` or ``auto``. ``cpu`` and ``cuda[:N]``
  put the whole model on that device. ``auto`` lets accelerate place the model
  (transformers' ``from_pretrained(device_map="auto", max_memory=...)``, which calls
  accelerate's ``infer_auto_device_map``): balanced over the visible GPUs, the rest
  offloaded to CPU memory, then to disk. Placement is accelerate's job; omniquant only
  parses the budget, checks it and records what accelerate decided.
- Without CUDA, ``auto`` means the CPU: the model is loaded as with ``cpu`` unless a
  ``--max-memory`` budget is given, in which case accelerate places it within the CPU
  budget and offloads the rest to disk (how a model larger than host memory, or a test
  on a tiny model, is run). ``cuda`` without CUDA is an error, never a silent fallback.
- Calibration inputs go to the device where the first module that consumes them
  executes (the backbone's embeddings); accelerate's hooks move activations between
  the devices of a split model.
- The fast Mamba kernels (mamba-ssm, causal-conv1d) are transformers' to pick at import
  time; omniquant reports whether they are importable and which implementation
  transformers resolved, and that they only run for CUDA tensors.
- Peak memory is read from the kernel (``VmHWM`` of ``/proc/self/status``: the
  process's peak resident set) and, per GPU, from ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from omniquant.errors import DeviceError, arg_ref

DEVICE_CHOICES = ("cpu", "cuda", "cuda:N", "auto")
_CUDA_RE = re.compile(r"^cuda(?::(\d+))?$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
#: The size units ``parse_size`` accepts (case-insensitive), for messages that list them.
SIZE_UNITS = ("B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB")


@dataclass
class Placement:
    """What ``--device``/``--max-memory`` resolved to on this host.

    Attributes:
        requested: ``--device`` as given.
        kind: ``single`` (the whole model on ``device``) or ``dispatch`` (accelerate's
            ``device_map``).
        device: The device of a ``single`` placement (``cpu``, ``cuda:0``...).
        max_memory: The parsed budget (accelerate's ``max_memory``: GPU index or
            ``cpu`` -> bytes), or None.
        offload_folder: Where accelerate writes disk-offloaded weights (``dispatch`` only).
    """

    requested: str
    kind: str
    device: str = "cpu"
    max_memory: dict[int | str, int] | None = None
    offload_folder: Path | None = None
    notes: list[str] = field(default_factory=list)

    def from_pretrained_kwargs(self) -> dict:
        """Keyword arguments for ``from_pretrained`` that realise this placement."""
        if self.kind == "single":
            return {"device_map": self.device} if self.device != "cpu" else {}
        kwargs: dict = {"device_map": "auto", "max_memory": self.max_memory}
        if self.offload_folder is not None:
            kwargs["offload_folder"] = str(self.offload_folder)
        return kwargs


def parse_size(text: str, where: str | None = None) -> int:
    """``120GiB`` / ``200GB`` / ``512MiB`` / ``1000000`` -> bytes (``where``: what the error
    names, default the ``max_memory`` argument)."""
    where = arg_ref("max_memory") if where is None else where
    m = _SIZE_RE.match(text)
    if not m:
        raise DeviceError(
            f"{where}: {text!r} is not a size; write e.g. 120GiB, 80GB, 512MiB or a byte count."
        )
    unit = (m.group(2) or "B").lower()
    return int(float(m.group(1)) * _UNITS[unit])


def parse_max_memory(text: str | None) -> dict[int | str, int] | None:
    """Parse ``0=120GiB,1=120GiB,cpu=200GiB`` into accelerate's ``max_memory`` dict.

    Keys are GPU indices or ``cpu``; values are sizes (``GiB``/``GB``/``MiB``/... or bytes).

    Raises:
        DeviceError: naming the bad entry and the expected form.
    """
    if text is None or not text.strip():
        return None
    out: dict[int | str, int] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        where = f"{arg_ref('max_memory')} {item.strip()!r}"
        if not sep:
            raise DeviceError(
                f"{where}: expected DEVICE=SIZE entries separated by commas, "
                "e.g. 0=120GiB,1=120GiB,cpu=200GiB."
            )
        if key.isdigit():
            dev: int | str = int(key)
        elif key == "cpu":
            dev = "cpu"
        elif _CUDA_RE.match(key) and _CUDA_RE.match(key).group(1) is not None:
            dev = int(_CUDA_RE.match(key).group(1))
        else:
            raise DeviceError(
                f"{where}: unknown device {key!r}; use a GPU index (0, 1, ...) or cpu "
                "(disk takes what does not fit)."
            )
        if dev in out:
            raise DeviceError(f"{where}: device {key!r} is given twice.")
        out[dev] = parse_size(value, where)
    return out


def cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_placement(
    device: str | None, max_memory: str | None, *, scratch: Path | None = None
) -> Placement:
    """Resolve ``--device`` and ``--max-memory`` against the GPUs this host has.

    Args:
        device: ``cpu``, ``cuda``, ``cuda:N``, ``auto`` or None (``auto``).
        max_memory: The ``--max-memory`` text, or None.
        scratch: Directory under which accelerate may offload weights to disk.

    Raises:
        DeviceError: an unknown device, CUDA asked for where there is none, a GPU index
            past the visible GPUs, or a budget that names GPUs with ``--device cpu``.
    """
    requested = (device or "auto").strip().lower()
    budget = parse_max_memory(max_memory)
    n_gpu = cuda_count()
    m = _CUDA_RE.match(requested)
    if requested not in ("cpu", "auto") and not m:
        raise DeviceError(
            "unknown device; choose one of cpu, cuda, cuda:N, auto.",
            arg="device",
            value=repr(device),
        )
    if budget is not None:
        gpus = sorted(k for k in budget if isinstance(k, int))
        past = [g for g in gpus if g >= n_gpu]
        if past:
            raise DeviceError(
                f"{arg_ref('max_memory')}: GPU {past[0]} is not visible on this host ({n_gpu} CUDA "
                f"device(s){', CUDA unavailable' if n_gpu == 0 else ''}); name GPUs 0.."
                f"{max(n_gpu - 1, 0)} or only cpu."
            )
        if requested != "auto":
            raise DeviceError(
                f"{arg_ref('max_memory')} is a budget for {arg_ref('device')} auto (accelerate's placement); "
                f"{arg_ref('device')} {requested} puts the whole model on one device. Drop one of them."
            )
    if m:
        if n_gpu == 0:
            raise DeviceError(
                f"CUDA is not available on this host (torch "
                f"{_torch_version()} sees no GPU). Use {arg_ref('device')} cpu or auto, or run on a GPU host "
                "with a CUDA build of torch.",
                arg="device",
                value=requested,
            )
        index = int(m.group(1) or 0)
        if index >= n_gpu:
            raise DeviceError(
                f"this host has {n_gpu} CUDA device(s) (cuda:0..cuda:{n_gpu - 1}).",
                arg="device",
                value=requested,
            )
        return Placement(requested, "single", device=f"cuda:{index}")
    if requested == "cpu":
        return Placement(requested, "single", device="cpu")
    # auto
    if n_gpu == 0 and budget is None:
        return Placement(
            requested, "single", device="cpu", notes=["no CUDA device: auto means cpu"]
        )
    offload = Path(scratch) if scratch is not None else None
    return Placement(requested, "dispatch", max_memory=budget, offload_folder=offload)


def _torch_version() -> str:
    import torch

    return torch.__version__


def auto_device_map(
    empty_model, max_memory: dict[int | str, int] | None, resident: tuple[str, ...] = ()
) -> tuple[dict[str, int | str], list[str]]:
    """accelerate's balanced placement of ``empty_model`` (built on ``meta``), with the
    modules named in ``resident`` kept whole on the main device (first GPU, else CPU).

    ``resident`` exists because transformers' omni model moves encoder inputs to
    ``encoder.device`` (its first parameter's device), which is ``meta`` for an offloaded
    encoder: offloading an encoder breaks the forward. Their bytes are taken off the main
    device's budget before accelerate places the rest, as transformers' ``device_map="auto"``
    would (``get_balanced_memory`` then ``infer_auto_device_map``).

    Returns:
        ``(device_map, notes)``.
    """
    import torch
    from accelerate.utils import compute_module_sizes, get_balanced_memory, infer_auto_device_map

    no_split = list(getattr(empty_model, "_no_split_modules", None) or [])
    mem = get_balanced_memory(
        empty_model, max_memory=max_memory, no_split_module_classes=no_split, dtype=torch.bfloat16
    )
    main: int | str = min((k for k in mem if isinstance(k, int)), default="cpu")
    sizes = compute_module_sizes(empty_model, dtype=torch.bfloat16)
    names = dict(empty_model.named_modules())
    resident = tuple(r for r in resident if r in names)
    resident_bytes = sum(sizes.get(r, 0) for r in resident)
    notes = []
    if resident:
        notes.append(
            f"{', '.join(resident)} ({resident_bytes / 2**30:.2f} GiB) kept on "
            f"{'cuda:' + str(main) if isinstance(main, int) else main}: transformers moves "
            "encoder inputs to the encoder's parameter device, which offloading would make meta"
        )
    budget = dict(mem)
    budget[main] = max(int(budget.get(main, 0)) - resident_bytes, 0)
    dmap = infer_auto_device_map(
        empty_model, max_memory=budget, no_split_module_classes=no_split, dtype=torch.bfloat16
    )
    for r in resident:
        # An entry covering an ancestor of ``r`` is spelt out per child, down to ``r``.
        while True:
            anc = [k for k in dmap if k == "" or r.startswith(k + ".")]
            if not anc:
                break
            k = anc[0]
            dev = dmap.pop(k)
            prefix = f"{k}." if k else ""
            for child, _ in names[k].named_children():
                dmap[prefix + child] = dev
            # direct parameters/buffers of k stay with it under their own names
            for pname, _ in names[k].named_parameters(recurse=False):
                dmap[prefix + pname] = dev
            for bname, _ in names[k].named_buffers(recurse=False):
                dmap[prefix + bname] = dev
        for key in [k for k in dmap if k == r or k.startswith(r + ".")]:
            del dmap[key]
        dmap[r] = main
    return dmap, notes


def input_device(model) -> str:
    """Device where the calibration inputs go: where the first consuming module executes.

    For an accelerate-dispatched model that is the execution device of the backbone's
    embeddings (the first layer every token passes); otherwise the device of the
    model's first parameter.
    """
    import torch

    # transformers' composite models answer with their language model's embeddings.
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for mod in (emb, model):
        if mod is None:
            continue
        hook = getattr(mod, "_hf_hook", None)
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return str(torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}"))
    for p in (emb or model).parameters():
        if p.device.type != "meta":
            return str(p.device)
    return "cpu"


def device_map_summary(model) -> dict:
    """Parameters and bytes per device (``cpu``, ``cuda:N``, ``disk``) of a loaded model.

    A dispatched model reports accelerate's ``hf_device_map``; parameters on ``meta``
    belong to the device their module was offloaded to.
    """
    hf_map = getattr(model, "hf_device_map", None)
    where: dict[str, str] = {}
    if hf_map:
        for prefix, dev in hf_map.items():
            where[prefix] = f"cuda:{dev}" if isinstance(dev, int) else str(dev)

    def device_of(name: str, p) -> str:
        if p.device.type != "meta" or not where:
            return str(p.device) if p.device.type != "meta" else "meta"
        best = ""
        for prefix in where:
            if (name == prefix or name.startswith(prefix + ".") or prefix == "") and len(
                prefix
            ) >= len(best):
                best = prefix
        return where.get(best, "meta")

    per: dict[str, dict[str, int]] = {}
    for name, p in model.named_parameters():
        dev = device_of(name, p)
        slot = per.setdefault(dev, {"parameters": 0, "bytes": 0})
        slot["parameters"] += p.numel()
        slot["bytes"] += p.numel() * p.element_size()
    summary: dict = {"per_device": dict(sorted(per.items()))}
    if hf_map:
        summary["device_map_entries"] = len(hf_map)
        summary["offloaded"] = sorted({v for v in where.values() if v in ("cpu", "disk")})
    return summary


def peak_memory() -> dict:
    """Peak memory so far: host resident set (``VmHWM``) and, per GPU, torch's allocator peak."""
    out: dict = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[{"VmHWM": "host_peak_rss_bytes", "VmRSS": "host_rss_bytes"}[key]] = (
                    int(value.split()[0]) * 1024
                )
    except OSError:  # not Linux
        pass
    import torch

    if torch.cuda.is_available():
        out["cuda_max_memory_allocated_bytes"] = {
            f"cuda:{i}": int(torch.cuda.max_memory_allocated(i))
            for i in range(torch.cuda.device_count())
        }
    return out


def reset_cuda_peaks() -> None:
    import torch

    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
