"""Whether a serving stack could construct the model from a checkpoint's files.

Policy: the other half of ``omniquant.checkpoint.readers``. The readers say which precision
vLLM or TensorRT-LLM would build per module; this says whether their model class can be
built at all: every config field it reads is present with a usable value and agrees with
the tensors and the tokenizer it will meet. The per-model knowledge (which fields, read
where) is the adapter's (``ModelAdapter.construction_findings``; for Nemotron Omni
``omniquant.models.nemotron_omni_serving``); this module reads the files (config.json,
safetensors headers, the tokenizer) and reports. Nothing is imported from either stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omniquant.checkpoint.layout import read_config_json
from omniquant.errors import ModelLoadError


@dataclass
class ConstructionView:
    """A reader's construction check of one checkpoint directory.

    Attributes:
        reader: ``vllm`` or ``trtllm``.
        findings: ``omniquant.models.nemotron_omni_serving.Finding``-like records (field,
            kind, detail, cite); empty when the class would be built.
    """

    reader: str
    findings: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def missing(self) -> list[str]:
        """Fields absent or unusable (the AttributeError/TypeError kind)."""
        return [f.field for f in self.findings if f.kind == "missing"]


def _tensor_headers(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    from safetensors import safe_open

    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, "pt") as fh:
            for k in fh.keys():  # noqa: SIM118 (a safetensors handle)
                sl = fh.get_slice(k)
                out[k] = (sl.get_dtype(), tuple(sl.get_shape()))
    return out


def _token_encoder(path: Path):
    """``encode(text) -> ids`` with the directory's tokenizer (no special tokens added), or
    None when there is none."""
    if not (path / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises many types; name the directory
        raise ModelLoadError(f"{path}: the tokenizer cannot be loaded: {exc}") from exc
    return lambda text: tok.encode(text, add_special_tokens=False)


def check_construction(path: str | Path, reader: str) -> ConstructionView:
    """What stops ``reader`` (``vllm`` or ``trtllm``) constructing the model of ``path``."""
    from omniquant.checkpoint.readers import READERS
    from omniquant.models import adapter_for

    if reader not in READERS:
        raise ModelLoadError(
            f"unknown reader; choose one of {', '.join(READERS)}.", arg="reader", value=repr(reader)
        )
    path = Path(path)
    config = read_config_json(path, ModelLoadError)
    if config is None:
        raise ModelLoadError(f"{path}: no config.json to check.")
    adapter = adapter_for(path)
    files = {p.name for p in path.iterdir() if p.is_file()}
    findings = adapter.construction_findings(
        reader, config, _tensor_headers(path), _token_encoder(path), files
    )
    return ConstructionView(reader, list(findings))


def render_construction(view: ConstructionView, limit: int = 40) -> str:
    """One line per finding, then the verdict."""
    lines = []
    for f in view.findings[:limit]:
        lines.append(f"  {f.kind.upper().replace('_', ' ')} {f.field}: {f.detail} [{f.cite}]")
    if len(view.findings) > limit:
        lines.append(f"  ... and {len(view.findings) - limit} more")
    missing = view.missing
    verdict = (
        f"{view.reader}: constructs the model from this config"
        if view.ok
        else f"{view.reader}: would NOT construct the model ({len(view.findings)} finding(s)"
        + (f"; missing: {', '.join(missing)}" if missing else "")
        + ")"
    )
    return "\n".join([*lines, verdict])
