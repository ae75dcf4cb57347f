"""The on-disk checkpoint format: file names, ``omniquant.json``, ``hf_quant_config.json``, checksums.

Policy: this module is the one owner of what an exported checkpoint directory holds
besides its tensors. Every stage that writes or reads these files goes through it:
``quantize`` writes them, ``verify``, ``audit``, ``inspect``, ``readers``, the engine
bundle, the report and the emulated loader read them. It imports nothing from a stage
(``quantize``, ``evaluate``, ``engine``, ``report``), so every stage may import it.

- **File names**: ``config.json``, ``hf_quant_config.json``, ``omniquant.json``,
  ``model.safetensors.index.json`` are named here only. (Tensor-name suffixes such as
  ``weight_scale`` belong to the format registry, ``omniquant.formats``.)
- **omniquant.json** is ``OmniquantRecord``: written with ``write_record`` and read with
  ``read_record``, nowhere else. It carries ``format_version`` (``FORMAT_VERSION``), which
  is checked on read *before* any other field: a record from a newer omniquant is refused
  with the file, its version, the version this omniquant reads and the fix (upgrade), so
  a changed field is never misread as damage; a missing or non-integer version is a clean
  error too. Then ``format_version`` and ``shards`` (file name -> sha256 hex) are
  required: every record since version 1 was introduced has them and every consumer
  needs them. The other fields are optional on read because version 1 grew without a
  bump (``size``, ``devices``, ``kernels``, ``peak_memory``, ``source.fingerprint`` came
  later), so a version-1 record written by an older omniquant lacks some of them.
  Unknown extra keys of a known version are kept, not refused: a minor addition by a
  later omniquant of the same version (the way version 1 grew) must not make an older
  omniquant refuse a checkpoint it can still read; a change that older readers would
  misread is what bumps ``format_version``. Reading is strict about types (no ``"1"`` for
  ``1``). The written bytes are ``json.dumps(record, indent=2, sort_keys=True) + "\\n"``
  of the fields that were set, extra keys included, so the same content gives the same
  bytes and a record read from disk writes back byte for byte.
- **hf_quant_config.json** is ``QuantConfig`` (modelopt's legacy shape, which
  TensorRT-LLM reads first): ``read_quant_config`` / ``QuantConfig.write``.
  ``serving_quant_config`` derives ``config.json``'s ``quantization_config`` from it with
  modelopt's own converter, so the two files cannot disagree. Which algorithms a stage
  accepts is the stage's business (the engine bundle accepts fewer); this type only
  checks the shape.
- **Checksums**: ``sha256_file`` is the one chunked hasher; it can copy the bytes it
  hashes in the same pass (the engine bundle copies shards that way).

pydantic models, not dataclasses: the record nests objects (``source``, ``recipe``)
whose absent and null fields must stay distinct for a byte-exact round trip, which
pydantic's ``exclude_unset`` keeps for free.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from omniquant.errors import OmniquantError

CONFIG_JSON = "config.json"
QUANT_CONFIG_JSON = "hf_quant_config.json"
RECORD_JSON = "omniquant.json"
INDEX_JSON = "model.safetensors.index.json"
#: The weight shards a checkpoint lists in ``omniquant.json``.
SHARD_GLOB = "model*.safetensors"
#: Files an export writes itself rather than copying them from the source checkpoint.
WRITTEN_FILES = frozenset({CONFIG_JSON, QUANT_CONFIG_JSON, RECORD_JSON, INDEX_JSON})

#: The ``omniquant.json`` format this omniquant writes and the newest it reads.
FORMAT_VERSION = 1

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 16 * 1024 * 1024


# ------------------------------------------------------------------------ JSON files
def read_json_file(path: Path, what: str, error: type[OmniquantError]) -> Any:
    """Parse a JSON file; unreadable, non-UTF-8 or invalid JSON raise ``error`` naming it."""
    label = f"{what} {path}" if what else str(path)
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"{label}: not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    except json.JSONDecodeError as exc:
        raise error(f"{label}: not valid JSON ({exc}).") from None
    except OSError as exc:
        raise error(f"{label}: cannot read it ({exc.strerror}).") from None


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` the way every checkpoint JSON file is written: sorted keys,
    two-space indent, a final newline (same content, same bytes)."""
    Path(path).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _validation_problem(exc: ValidationError) -> str:
    """The first problems of a pydantic error as ``field.path: message`` phrases (read
    with ``omniquant.schema.field_problems``, the one reading of pydantic's errors)."""
    from omniquant.schema import field_problems

    problems = field_problems(exc)
    parts = [
        f"no {p.where!r}"
        if p.kind == "missing"
        else f"{p.where or '(top level)'} = {p.input!r}: {p.message}"
        for p in problems[:3]
    ]
    more = len(problems) - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


class _Open(BaseModel):
    """Frozen, keeps unknown keys (see the module docstring for why)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    def to_json(self) -> dict[str, Any]:
        """The fields that were set (extras included), as plain JSON values."""
        return self.model_dump(mode="python", exclude_unset=True)


# ------------------------------------------------------------------- omniquant.json
def _sha256_hex(value: str) -> str:
    if not _SHA256.match(value):
        raise ValueError("not a sha256 hex digest (64 lower-case hex characters)")
    return value


Sha256 = Annotated[str, AfterValidator(_sha256_hex)]


class SourceRecord(_Open):
    """The model a checkpoint was quantized from.

    Attributes:
        path: Its directory, resolved, when quantized.
        model_type: Its ``config.json`` ``model_type``.
        fingerprint: ``omniquant.checkpoint.verify.source_fingerprint`` of its shards.
    """

    path: str | None = None
    model_type: str | None = None
    fingerprint: str | None = None


class RecipeRecord(_Open):
    """The recipe a checkpoint was quantized with.

    Attributes:
        name: ``metadata.name``.
        path: The recipe file.
        effective: The recipe after overrides, as JSON.
    """

    name: str | None = None
    path: str | None = None
    effective: dict[str, Any] | None = None


class OmniquantRecord(_Open):
    """``omniquant.json``: what a quantize run did and the sha256 of every shard it wrote.

    Only ``format_version`` and ``shards`` are required on read (see the module docstring);
    the free-form blocks (``calibration``, ``plan``, ``size``, ``devices``...) are written by
    the stages that own them and kept as JSON objects here.
    """

    format_version: int
    shards: dict[str, Sha256] = Field(min_length=1)
    source: SourceRecord | None = None
    recipe: RecipeRecord | None = None
    recipe_sha256: str | None = None
    versions: dict[str, str] | None = None
    calibration: dict[str, Any] | None = None
    #: The calibration algorithm per rule, modelopt's parameters and per-layer fallbacks
    #: (``omniquant.quantize.algorithms``); absent in checkpoints written before it.
    algorithm: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None
    quantized: dict[str, Any] | None = None
    size: dict[str, Any] | None = None
    warnings: list[str] | None = None
    devices: dict[str, Any] | None = None
    kernels: dict[str, Any] | None = None
    peak_memory: dict[str, Any] | None = None
    created_unix: int | None = None

    def to_bytes(self) -> bytes:
        """The file's bytes."""
        return (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode()


def write_record(directory: Path, record: OmniquantRecord) -> Path:
    """Write ``record`` as ``directory/omniquant.json``; returns the file."""
    path = Path(directory) / RECORD_JSON
    path.write_bytes(record.to_bytes())
    return path


def parse_record(data: Any, label: str, error: type[OmniquantError]) -> OmniquantRecord:
    """``OmniquantRecord`` from parsed JSON; ``label`` names the file in messages.

    Raises:
        error: Not an object, no or a bad ``format_version``, a version newer than
            ``FORMAT_VERSION``, or a field of the wrong type.
    """
    from omniquant import __version__

    if not isinstance(data, dict):
        raise error(f"{label}: not a JSON object; re-export the checkpoint.")
    if "format_version" not in data:
        raise error(
            f"{label}: no 'format_version'; this is not an omniquant.json omniquant wrote (or "
            "it is damaged). Re-export the checkpoint with `omniquant quantize`."
        )
    version = data["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise error(
            f"{label}: format_version = {version!r} is not a positive integer; the file is "
            "damaged. Re-export the checkpoint with `omniquant quantize`."
        )
    if version > FORMAT_VERSION:
        raise error(
            f"{label}: format_version {version} is newer than this omniquant ({__version__}) "
            f"reads (format_version {FORMAT_VERSION}); the checkpoint was written by a newer "
            "omniquant. Upgrade omniquant (pip install --upgrade omniquant) to read it."
        )
    try:
        return OmniquantRecord.model_validate(data, strict=True)
    except ValidationError as exc:
        raise error(
            f"{label}: {_validation_problem(exc)}; re-export the checkpoint with "
            "`omniquant quantize`."
        ) from None


def read_record(
    directory: Path, error: type[OmniquantError], what: str = ""
) -> OmniquantRecord | None:
    """``directory/omniquant.json``, or None when the directory has none.

    Args:
        directory: The checkpoint directory.
        error: The error class of the calling stage.
        what: How the user named the checkpoint (``--candidate``), prefixed to messages.

    Raises:
        error: The file is unreadable, not JSON, from a newer omniquant, or malformed.
    """
    path = Path(directory) / RECORD_JSON
    if not path.is_file():
        return None
    label = f"{what} {path}" if what else str(path)
    return parse_record(read_json_file(path, what, error), label, error)


# ------------------------------------------------------------- hf_quant_config.json
class LayerQuant(_Open):
    """One entry of ``quantization.quantized_layers`` (MIXED_PRECISION)."""

    quant_algo: str | None = None
    group_size: int | None = None


class Quantization(_Open):
    """The ``quantization`` object of ``hf_quant_config.json``.

    Attributes:
        quant_algo: ``FP8``, ``NVFP4``, ``MIXED_PRECISION``... (what a stage accepts is its
            own business).
        kv_cache_quant_algo: ``FP8`` or None.
        group_size: The NVFP4 block size, when given.
        exclude_modules: Hub module names or fnmatch patterns left unquantized.
        quantized_layers: For MIXED_PRECISION, the algorithm of every quantized module.
    """

    quant_algo: str | None = None
    kv_cache_quant_algo: str | None = None
    group_size: int | None = None
    exclude_modules: list[str] = Field(default_factory=list)
    quantized_layers: dict[str, LayerQuant] | None = None


class QuantConfig(_Open):
    """``hf_quant_config.json``: modelopt's legacy shape, in hub module names.

    Attributes:
        producer: Who wrote it (``{"name": "modelopt", "version": ...}``).
        quantization: The quantization it declares.
    """

    producer: dict[str, Any] | None = None
    quantization: Quantization

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QuantConfig:
        """From a dict in the file's shape (an export builds one); raises pydantic's
        ``ValidationError`` on a bad shape (a bug of the builder, not user input)."""
        return cls.model_validate(data)

    def write(self, directory: Path) -> Path:
        """Write ``directory/hf_quant_config.json``; returns the file."""
        path = Path(directory) / QUANT_CONFIG_JSON
        write_json(path, self.to_json())
        return path


def read_quant_config(
    directory: Path, error: type[OmniquantError], what: str = ""
) -> QuantConfig | None:
    """``directory/hf_quant_config.json``, or None (a BF16 checkpoint) when absent.

    Raises:
        error: The file is unreadable, not JSON, or not the shape modelopt writes (a
            ``quantization`` object with typed fields).
    """
    path = Path(directory) / QUANT_CONFIG_JSON
    if not path.is_file():
        return None
    label = f"{what} {path}" if what else str(path)
    data = read_json_file(path, what, error)
    if not isinstance(data, dict) or not isinstance(data.get("quantization"), dict):
        raise error(f"{label}: 'quantization' must be a JSON object; re-export the checkpoint.")
    try:
        return QuantConfig.model_validate(data, strict=True)
    except ValidationError as exc:
        raise error(f"{label}: {_validation_problem(exc)}; re-export the checkpoint.") from None


def serving_quant_config(hf_quant: QuantConfig | dict) -> dict:
    """``config.json``'s ``quantization_config``: modelopt's converter applied to ``hf_quant``.

    The same converter modelopt's own exporter uses (``convert_hf_quant_config_format``,
    pinned modelopt 0.47) turns the legacy ``hf_quant_config.json`` shape into the one
    serving stacks read from ``config.json`` (``ignore``, ``kv_cache_scheme``,
    ``config_groups``, ``quantized_layers``, ``quant_method: modelopt``); vLLM reads
    only this block when it exists. A deep copy keeps the two files independent.
    """
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

    data = hf_quant.to_json() if isinstance(hf_quant, QuantConfig) else hf_quant
    return convert_hf_quant_config_format(copy.deepcopy(data))


def write_config_json(directory: Path, config: dict[str, Any], quant: QuantConfig) -> Path:
    """Write ``directory/config.json``: ``config`` with ``quantization_config`` derived
    from ``quant`` (``serving_quant_config``); returns the file."""
    path = Path(directory) / CONFIG_JSON
    write_json(path, {**config, "quantization_config": serving_quant_config(quant)})
    return path


def read_config_json(directory: Path, error: type[OmniquantError], what: str = "") -> dict | None:
    """``directory/config.json`` as a dict, or None when absent.

    Raises:
        error: Unreadable, not JSON, or not an object.
    """
    path = Path(directory) / CONFIG_JSON
    if not path.is_file():
        return None
    data = read_json_file(path, what, error)
    if not isinstance(data, dict):
        label = f"{what} {path}" if what else str(path)
        raise error(f"{label}: not a JSON object; this is not a Hugging Face config.")
    return data


# ------------------------------------------------------------------------- checksums
def sha256_file(path: Path, *, copy_to: Path | None = None) -> str:
    """sha256 hex digest of ``path``, read in 16 MiB chunks into one reused buffer.

    With ``copy_to`` the bytes are also written there in the same pass (and the file's
    mode and times copied), so a copy is hashed as it is made. (A fresh 16 MiB ``bytes``
    per chunk was a fresh mapping whose pages the kernel zero-fills: a million page
    faults to hash the FP8 slice's 3.9 GB.)
    """
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with (
        open(path, "rb", buffering=0) as fin,
        open(copy_to, "wb") if copy_to is not None else contextlib.nullcontext() as fout,
    ):
        while n := fin.readinto(buf):
            digest.update(view[:n])
            if fout is not None:
                fout.write(view[:n])
    if copy_to is not None:
        shutil.copystat(path, copy_to)
    return digest.hexdigest()
