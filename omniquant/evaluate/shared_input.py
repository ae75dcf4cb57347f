"""One activation quantizer per (format, stored input scale), shared by the GEMMs that use it.

Policy: linears that read the same tensor under the same stored input scale would quantize
the same values to the same result several times per forward: an attention's q/k/v
projections, and a MoE's routed experts and its shared expert (modelopt calibrates each
quantizer on the input it sees, so equal inputs give equal scales). The emulated loader
gives every such GEMM input one :class:`RememberingQuantizer` per (format, scale bytes);
it keeps its last input and result, and a call on that same memory, unwritten since,
returns the result instead of quantizing again.

"The same memory, unwritten since" is checked, not assumed: the same data pointer, dtype,
element count and last dimension, both contiguous, and torch's version counter (shared by
views of one tensor, bumped by every in-place write) unchanged on the input and on the
kept result. Holding the last input keeps its memory from being handed to another tensor.
The activation quantizers act on each row alone (FP8 per element, NVFP4 per 16-element
block of the last dimension), so a view of the same memory in another shape with the same
last dimension (the MoE passes ``[tokens, hidden]`` to its experts and ``[1, tokens,
hidden]`` to its shared expert) quantizes to the same result viewed in that shape: the
bits are those of quantizing again (``tests/test_shared_input.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class RememberingQuantizer:
    """``quantize``, returning its last result again for an unchanged last input."""

    __slots__ = ("_input", "_input_version", "_output", "_output_version", "quantize")

    def __init__(self, quantize: Callable[[torch.Tensor], torch.Tensor]):
        self.quantize = quantize
        self._input: torch.Tensor | None = None
        self._input_version = self._output_version = -1
        self._output: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._input is not None and self._same_unchanged(x):
            return self._output.view(x.shape)
        out = self.quantize(x)
        if _rememberable(x) and _rememberable(out):
            self._input, self._output = x, out
            self._input_version, self._output_version = x._version, out._version
        else:
            self._input = self._output = None
        return out

    def _same_unchanged(self, x: torch.Tensor) -> bool:
        last = self._input
        return (
            x.data_ptr() == last.data_ptr()
            and x.dtype == last.dtype
            and x.numel() == last.numel()
            and x.shape[-1] == last.shape[-1]
            and x.device == last.device
            and _rememberable(x)
            and x._version == self._input_version
            and self._output._version == self._output_version
        )


def _rememberable(t: torch.Tensor) -> bool:
    # Inference tensors have no version counter; autograd would need its own graph.
    return (
        t.dim() > 0
        and t.numel() > 0
        and t.is_contiguous()
        and not t.is_inference()
        and not (t.requires_grad and torch.is_grad_enabled())
    )


class SharedQuantizers:
    """``(format, input scale) -> RememberingQuantizer``, one per distinct pair."""

    def __init__(self, make: Callable[[str, torch.Tensor], Callable]):
        self._make = make
        self._by_key: dict[tuple, RememberingQuantizer] = {}

    def get(self, fmt: str, scale: torch.Tensor) -> RememberingQuantizer:
        """The quantizer for ``fmt`` under ``scale`` (equal bytes: the same object)."""
        exact = scale.detach().float().cpu().contiguous()
        key = (fmt, tuple(exact.shape), exact.numpy().tobytes())
        if key not in self._by_key:
            self._by_key[key] = RememberingQuantizer(self._make(fmt, scale))
        return self._by_key[key]
