"""Calibration memory per device, by stated arithmetic over shapes.

Policy:
- ``estimate_calibration_memory`` is a pure function of weight placement units
  (name, bytes), the model's shape summary (``CalibrationShapes``, from the
  adapter), the token count of the longest calibration sample, and the
  ``--device`` / ``--max-memory`` strings. It loads nothing. ``--max-memory`` is read
  by the quantize stage's parser (``omniquant.devices``), so plan and quantize accept
  and refuse the same budgets.
- Every term is an explicit formula whose text is returned with the numbers. The
  terms are the largest *transient* allocations of one calibration forward of
  transformers' eager implementation (batch 1, BF16 weights and activations), not
  a profile: allocator fragmentation, Python objects and modelopt's per-quantizer
  scalars (a few bytes each) are not counted.
- ``--max-memory`` is written as accelerate's ``max_memory`` dict is keyed: GPU
  ordinals and ``cpu`` (``0=120GiB,1=120GiB,cpu=200GiB``). Weights are placed in
  module order, GPUs first, each GPU keeping room for the activation peak (and
  the force-all overhead), the rest on ``cpu``, as accelerate's sequential device
  map does.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from omniquant.devices import parse_max_memory as parse_budget
from omniquant.devices import parse_size  # noqa: F401  (re-exported: one size parser)
from omniquant.errors import DeviceError, arg_ref
from omniquant.models.base import CalibrationShapes

#: ``--device`` / ``--max-memory`` errors: the same class as quantize's (one parser).
MemorySpecError = DeviceError


def parse_max_memory(text: str) -> dict[str, int]:
    """``0=120GiB,1=120GiB,cpu=200GiB`` -> ``{"cuda:0": ..., "cuda:1": ..., "cpu": ...}``.

    Parsed by quantize's parser (``omniquant.devices.parse_max_memory``: GPU ordinals,
    ``cuda:N`` or ``cpu``; sizes with B/KB/.../GiB/TiB units), named as devices here; GPUs
    come first, in ordinal order, then ``cpu``. Empty items are ignored.

    Raises:
        MemorySpecError: naming the bad item and the expected form.
    """
    budget = parse_budget(",".join(p for p in text.split(",") if p.strip()))
    if not budget:
        raise MemorySpecError(
            f"{arg_ref('max_memory')}: empty; write e.g. 0=120GiB,1=120GiB,cpu=200GiB."
        )
    out = {("cpu" if key == "cpu" else f"cuda:{key}"): size for key, size in budget.items()}
    return dict(sorted(out.items(), key=lambda kv: _device_order(kv[0])))


def parse_devices(text: str) -> list[str]:
    """``cpu`` / ``cuda`` / ``cuda:0,cuda:1`` / ``0,1`` -> device names (``cuda`` is ``cuda:0``)."""
    devices = [_device_name(p.strip(), arg_ref("device")) for p in text.split(",") if p.strip()]
    if not devices:
        raise MemorySpecError(
            f"{arg_ref('device')}: empty; write cpu, cuda, cuda:0 or cuda:0,cuda:1."
        )
    return devices


def _device_name(key: str, where: str) -> str:
    k = key.lower()
    if k == "cpu":
        return "cpu"
    if k == "cuda":
        return "cuda:0"
    m = re.fullmatch(r"(?:cuda:)?(\d+)", k)
    if not m:
        raise MemorySpecError(
            f"{where}: unknown device {key!r}; use cpu, a GPU ordinal (0, 1, ...) or cuda:N."
        )
    return f"cuda:{int(m.group(1))}"


def _device_order(device: str) -> tuple[int, int]:
    return (1, 0) if device == "cpu" else (0, int(device.split(":")[1]))


@dataclass
class MemoryEstimate:
    """Per-device calibration memory and the arithmetic behind it."""

    tokens: int
    weights_bytes: int
    activation_terms: dict[str, int]
    activation_peak_bytes: int
    force_all_experts: bool
    force_all_overhead_bytes: int
    devices: list[dict]
    fits: bool | None
    arithmetic: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "tokens": self.tokens,
            "weights_bytes": self.weights_bytes,
            "activation_terms": dict(self.activation_terms),
            "activation_peak_bytes": self.activation_peak_bytes,
            "force_all_experts": self.force_all_experts,
            "force_all_overhead_bytes": self.force_all_overhead_bytes,
            "devices": [dict(d) for d in self.devices],
            "fits": self.fits,
            "arithmetic": list(self.arithmetic),
        }


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def activation_terms(shapes: CalibrationShapes, tokens: int) -> tuple[dict[str, int], list[str]]:
    """The largest transient tensors of one forward over ``tokens`` tokens (bytes, formula)."""
    s, t, a = shapes, tokens, shapes.act_bytes
    name, fin, fout = s.widest_linear
    chunks = math.ceil(t / s.chunk)
    terms = {
        "widest_linear": t * (fin + fout) * a,
        "attention_scores": s.attention_heads * t * t * 4,
        "mamba_chunk_scan": 3 * chunks * s.chunk * s.chunk * s.mamba_heads * 4
        + 2 * chunks * s.mamba_heads * s.mamba_head_dim * s.ssm_state * 4,
        "moe_routing_mask": t * s.experts_per_token * (s.experts + 1) * 8,
    }
    text = [
        f"widest_linear ({name}): T x (in {fin} + out {fout}) x {a} B = {terms['widest_linear']:,}",
        (
            f"attention_scores (SDPA math path, the CPU one; flash attention needs none): "
            f"heads {s.attention_heads} x T^2 x 4 B = {terms['attention_scores']:,}"
        ),
        (
            f"mamba_chunk_scan (PyTorch path, fp32): 3 x ceil(T/{s.chunk}) x {s.chunk}^2 x heads "
            f"{s.mamba_heads} x 4 B (L, G, M) + 2 x ceil(T/{s.chunk}) x {s.mamba_heads} x "
            f"{s.mamba_head_dim} x {s.ssm_state} x 4 B (states) = {terms['mamba_chunk_scan']:,}"
        ),
        (
            f"moe_routing_mask (one_hot int64): T x top-{s.experts_per_token} x "
            f"(experts {s.experts} + 1) x 8 B = {terms['moe_routing_mask']:,}"
        ),
    ]
    return terms, text


def force_all_overhead(shapes: CalibrationShapes, tokens: int) -> tuple[int, str]:
    """Extra bytes while every token runs through every expert (statistics pass)."""
    s, t, a = shapes, tokens, shapes.act_bytes
    mask = t * s.experts * (s.experts + 1) * 8
    weights = t * s.experts * 4
    accumulator = t * s.hidden * 4
    one_expert = t * (3 * s.hidden * a + 2 * s.expert_width * a)
    total = mask + weights + accumulator + one_expert
    text = (
        f"force-all: one_hot mask T x {s.experts} x {s.experts + 1} x 8 B ({mask:,}) + zero "
        f"routing weights T x {s.experts} x 4 B ({weights:,}) + fp32 accumulator T x {s.hidden} x "
        f"4 B ({accumulator:,}) + one expert's temporaries T x (3 x {s.hidden} + 2 x "
        f"{s.expert_width}) x {a} B ({one_expert:,}) = {total:,}"
    )
    return total, text


def estimate_calibration_memory(
    units: list[tuple[str, int]],
    shapes: CalibrationShapes,
    tokens: int,
    *,
    force_all_experts: bool = False,
    device: str | None = None,
    max_memory: str | None = None,
) -> MemoryEstimate:
    """Calibration memory per device.

    Args:
        units: ``(name, bytes)`` of the model's weights in module order, in the
            granularity they may be placed (a backbone layer, a tower).
        shapes: The model's shape summary (``adapter.calibration_shapes``).
        tokens: Backbone tokens of the longest calibration sample.
        force_all_experts: The recipe's expert-coverage policy runs every expert.
        device: ``--device`` string (``cpu``, ``cuda``, ``cuda:0,cuda:1``): the devices
            that may hold weights and run layers. None: ``cpu`` without
            ``max_memory``, else every device ``max_memory`` names.
        max_memory: ``--max-memory`` string (``0=120GiB,cpu=200GiB``) or None.

    Raises:
        MemorySpecError: a bad string, or a ``--device`` that ``--max-memory`` gives
            no budget.
    """
    if tokens < 1:
        raise MemorySpecError("must be at least 1.", arg="tokens", value=tokens)
    weights = sum(b for _, b in units)
    terms, lines = activation_terms(shapes, tokens)
    peak = max(terms.values())
    force_bytes, force_text = force_all_overhead(shapes, tokens)
    force_bytes = force_bytes if force_all_experts else 0
    arithmetic = [f"T = {tokens} backbone tokens (longest calibration sample), batch 1"]
    arithmetic.append(f"weights: {weights:,} bytes ({gib(weights)}) in the load dtype")
    arithmetic += [f"activation {line}" for line in lines]
    arithmetic.append(f"activation peak = max of the terms = {peak:,} ({gib(peak)})")
    arithmetic.append(force_text + ("" if force_all_experts else " (not used by this recipe)"))
    reserve = peak + force_bytes

    if max_memory is None:
        devices = parse_devices(device or "cpu")
        if len(devices) > 1:
            raise MemorySpecError(
                f"several devices need {arg_ref('max_memory')} to place weights "
                f"(e.g. {arg_ref('max_memory')} 0=120GiB,1=120GiB,cpu=200GiB).",
                arg="device",
                value=device,
            )
        need = weights + reserve
        rows = [{"device": devices[0], "weights": weights, "reserve": reserve, "total": need,
                 "budget": None, "fits": None}]  # fmt: skip
        arithmetic.append(
            f"{devices[0]}: weights {gib(weights)} + activation peak {gib(peak)} + force-all "
            f"{gib(force_bytes)} = {gib(need)} (no --max-memory: no budget to check)"
        )
        return MemoryEstimate(tokens, weights, terms, peak, force_all_experts, force_bytes,
                              rows, None, arithmetic)  # fmt: skip

    budgets = parse_max_memory(max_memory)
    if device is not None:
        wanted = parse_devices(device)
        missing = [d for d in wanted if d not in budgets]
        if missing:
            raise MemorySpecError(
                f"{arg_ref('max_memory')} {max_memory} gives no budget for "
                f"{', '.join(missing)}; add e.g. {missing[0].split(':')[-1]}=80GiB.",
                arg="device",
                value=device,
            )
        budgets = {d: b for d, b in budgets.items() if d in wanted or d == "cpu"}
    rows = []
    placed = {d: 0 for d in budgets}
    order = list(budgets)
    i = 0
    for name, nbytes in units:
        while i < len(order):
            d = order[i]
            room = budgets[d] - (0 if d == "cpu" else reserve) - placed[d]
            if nbytes <= room:
                placed[d] += nbytes
                break
            i += 1
        else:
            placed.setdefault("unplaced", 0)
            placed["unplaced"] = placed.get("unplaced", 0) + nbytes
    unplaced = placed.pop("unplaced", 0)
    compute = [d for d in order if d != "cpu" and placed[d]] or ["cpu"]
    for d in order:
        res = reserve if d in compute else 0
        total = placed[d] + res
        rows.append({"device": d, "weights": placed[d], "reserve": res, "total": total,
                     "budget": budgets[d], "fits": total <= budgets[d]})  # fmt: skip
        arithmetic.append(
            f"{d}: weights {gib(placed[d])} + reserve {gib(res)} = {gib(total)} of "
            f"{gib(budgets[d])}"
        )
    if unplaced:
        arithmetic.append(f"does not fit: {gib(unplaced)} of weights have no room on any device")
    fits = not unplaced and all(r["fits"] for r in rows)
    return MemoryEstimate(tokens, weights, terms, peak, force_all_experts, force_bytes, rows,
                          fits, arithmetic)  # fmt: skip
