"""The on-disk format's one owner (omniquant.checkpoint.layout) and outdir.staged_dir.

The record round trip and the version check run on a real export of the tiny model
(the session's ``quantized`` fixture); everything else on small files written here.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

import omniquant
from omniquant.checkpoint.layout import (
    FORMAT_VERSION,
    QUANT_CONFIG_JSON,
    RECORD_JSON,
    QuantConfig,
    parse_record,
    read_quant_config,
    read_record,
    serving_quant_config,
    sha256_file,
    write_record,
)
from omniquant.cli import CLI_NAMES
from omniquant.errors import AuditError, ExportError, ModelLoadError, argument_style

PACKAGE = Path(omniquant.__file__).parent
DIGEST = "ab" * 32


def _edit_record(ckpt: Path, change) -> None:
    data = json.loads((ckpt / RECORD_JSON).read_text())
    change(data)
    (ckpt / RECORD_JSON).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@pytest.fixture
def fp8_copy(quantized, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(quantized("fp8_omni"), out)
    return out


# ---------------------------------------------------------------------- round trip
def test_exported_record_and_quant_config_round_trip_byte_for_byte(quantized, tmp_path):
    ckpt = quantized("fp8_omni")
    text = (ckpt / RECORD_JSON).read_text()
    # The writer's bytes are json.dumps(content, indent=2, sort_keys=True) + "\n", as before.
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    record = read_record(ckpt, ModelLoadError)
    assert record.format_version == FORMAT_VERSION == 1
    assert record.recipe.name == "fp8_omni"
    assert set(record.shards) == {"model.safetensors"}
    write_record(tmp_path, record)
    assert (tmp_path / RECORD_JSON).read_bytes() == (ckpt / RECORD_JSON).read_bytes()

    qc = read_quant_config(ckpt, ModelLoadError)
    assert qc.quantization.quant_algo == "FP8"
    qc.write(tmp_path)
    assert (tmp_path / QUANT_CONFIG_JSON).read_bytes() == (ckpt / QUANT_CONFIG_JSON).read_bytes()
    # config.json's block is the converter's output for the same type.
    config = json.loads((ckpt / "config.json").read_text())
    assert config["quantization_config"] == serving_quant_config(qc)


def test_record_keeps_absent_null_and_unknown_fields_apart(tmp_path):
    """A version-1 record of an older omniquant (no ``devices``, a ``source`` without a
    fingerprint), a null field and a key this omniquant does not know all write back as read."""
    data = {
        "format_version": 1,
        "shards": {"model.safetensors": DIGEST},
        "source": {"path": "/m", "model_type": None},
        "warnings": [],
        "added_later": {"x": [1, 2.5, None]},
    }
    record = parse_record(data, "omniquant.json", ModelLoadError)
    assert record.devices is None and record.source.fingerprint is None
    assert record.to_json() == data
    write_record(tmp_path, record)
    assert (tmp_path / RECORD_JSON).read_text() == json.dumps(data, indent=2, sort_keys=True) + "\n"


# ------------------------------------------------------------------- version check
def test_newer_format_version_is_refused_by_inspect_and_audit(fp8_copy, capsys):
    from omniquant.checkpoint.audit import audit_checkpoint
    from omniquant.cli import main

    _edit_record(fp8_copy, lambda d: d.update(format_version=FORMAT_VERSION + 1, new_block={}))
    file = fp8_copy / RECORD_JSON
    why = (
        f"format_version 2 is newer than this omniquant ({omniquant.__version__}) reads "
        "(format_version 1); the checkpoint was written by a newer omniquant. Upgrade "
        "omniquant (pip install --upgrade omniquant) to read it."
    )
    assert main(["inspect", str(fp8_copy)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"inspect {file}: {why}")
    with pytest.raises(AuditError) as err:
        audit_checkpoint(fp8_copy)
    assert str(err.value) == f"{file}: {why}"
    assert main(["inspect", "--audit", str(fp8_copy)]) == 3
    assert f"{file}: {why}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda d: d.pop("format_version"), "no 'format_version'; this is not an omniquant.json"),
        (lambda d: d.update(format_version="1"), "format_version = '1' is not a positive integer"),
        (
            lambda d: d.update(format_version=True),
            "format_version = True is not a positive integer",
        ),
        (lambda d: d.update(format_version=0), "format_version = 0 is not a positive integer"),
        (lambda d: d.pop("shards"), "no 'shards'; re-export the checkpoint"),
        (lambda d: d.update(shards={}), "shards = {}: Dictionary should have at least 1 item"),
        (
            lambda d: d.update(shards={"model.safetensors": "abc"}),
            "shards.model.safetensors = 'abc': not a sha256 hex digest",
        ),
        (lambda d: d.update(source="x"), "source = 'x': Input should be a valid dictionary"),
        (
            lambda d: d.update(created_unix="now"),
            "created_unix = 'now': Input should be a valid integer",
        ),
    ],
)
def test_damaged_record_is_a_clean_error(fp8_copy, capsys, change, fragment):
    from omniquant.cli import main

    _edit_record(fp8_copy, change)
    assert main(["inspect", str(fp8_copy)]) == 2
    err = capsys.readouterr().err
    assert f"inspect {fp8_copy / RECORD_JSON}: " in err and fragment in err
    assert "Traceback" not in err


def test_engine_reads_the_record_through_the_type(fp8_copy, tmp_path):
    from omniquant.engine.checkpoint import read_checkpoint
    from omniquant.errors import EngineError

    info = read_checkpoint(fp8_copy)
    assert info.recipe["name"] == "fp8_omni" and set(info.expected_sha256) == {"model.safetensors"}
    _edit_record(fp8_copy, lambda d: d.update(format_version=7))
    with pytest.raises(EngineError, match=r"omniquant.json: format_version 7 is newer than"):
        read_checkpoint(fp8_copy)


# ----------------------------------------------------------------- hf_quant_config
def test_quant_config_shape_errors_name_the_file(tmp_path):
    assert read_quant_config(tmp_path, ModelLoadError) is None  # BF16: no file
    f = tmp_path / QUANT_CONFIG_JSON
    f.write_text(json.dumps({"producer": {"name": "modelopt"}}))
    with pytest.raises(ModelLoadError) as err:
        read_quant_config(tmp_path, ModelLoadError)
    assert str(err.value) == f"{f}: 'quantization' must be a JSON object; re-export the checkpoint."
    f.write_text(json.dumps({"quantization": {"quant_algo": "FP8", "exclude_modules": "lm_head"}}))
    with pytest.raises(ModelLoadError) as err:
        read_quant_config(tmp_path, ModelLoadError)
    assert str(err.value) == (
        f"{f}: quantization.exclude_modules = 'lm_head': Input should be a valid list; "
        "re-export the checkpoint."
    )


def test_quant_config_from_json_writes_what_it_was_given(tmp_path):
    data = {
        "producer": {"name": "modelopt", "version": "0.47.0"},
        "quantization": {
            "quant_algo": "MIXED_PRECISION",
            "kv_cache_quant_algo": None,
            "exclude_modules": ["lm_head"],
            "quantized_layers": {
                "a": {"quant_algo": "FP8"},
                "b": {"quant_algo": "NVFP4", "group_size": 16},
            },
        },
    }
    QuantConfig.from_json(data).write(tmp_path)
    assert (tmp_path / QUANT_CONFIG_JSON).read_text() == json.dumps(
        data, indent=2, sort_keys=True
    ) + "\n"


# ----------------------------------------------------------------------- checksums
def test_sha256_file_hashes_and_copies_in_one_pass(tmp_path):
    src = tmp_path / "blob"
    payload = bytes(range(256)) * 70_001  # more than one 16 MiB chunk
    src.write_bytes(payload)
    src.chmod(0o640)
    want = hashlib.sha256(payload).hexdigest()
    assert sha256_file(src) == want
    assert sha256_file(src, copy_to=tmp_path / "copy") == want
    assert (tmp_path / "copy").read_bytes() == payload
    assert (tmp_path / "copy").stat().st_mode & 0o777 == 0o640


# ---------------------------------------------------------------------- staged_dir
def test_staged_dir_renames_into_place_only_on_success(tmp_path):
    from omniquant.outdir import staged_dir

    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_dir(out, replace=False) as tmp:
        assert tmp.is_dir() and tmp.name.startswith(".omniquant-tmp-out-")
        (tmp / "half").write_text("x")
        raise RuntimeError("check failed")
    assert not out.exists() and not list(tmp_path.iterdir())

    with staged_dir(out, replace=False) as tmp:
        (tmp / "a").write_text("1")
    assert (out / "a").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    with staged_dir(out, replace=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    with pytest.raises(ExportError) as err, staged_dir(out, replace=False) as tmp:
        (tmp / "c").write_text("3")  # out exists: someone else made it meanwhile
    assert str(err.value) == (
        f"out {out}: created by someone else during this run; pass force to replace it, "
        "or choose another out."
    )
    with argument_style(CLI_NAMES):  # as `omniquant quantize` prints it
        assert str(err.value) == (
            f"--out {out}: created by someone else during this run; pass --force to replace "
            "it, or choose another --out."
        )
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_staged_dir_turns_a_write_failure_into_export_error(tmp_path):
    from omniquant.outdir import staged_dir

    out = tmp_path / "out"
    with (
        pytest.raises(ExportError, match=r"writing the checkpoint failed \(No space left"),
        staged_dir(out, replace=False),
    ):
        raise OSError(28, "No space left on device")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------- one owner only
def test_file_names_are_spelled_only_in_layout_and_checkpoint_imports_no_stage():
    names = re.compile(r"[\"'](omniquant\.json|hf_quant_config\.json)[\"']")
    spelled = [
        str(f.relative_to(PACKAGE))
        for f in sorted(PACKAGE.rglob("*.py"))
        if names.search(f.read_text())
    ]
    assert spelled == ["checkpoint/layout.py"]
    upward = re.compile(
        r"^\s*(from|import) omniquant\.(quantize|evaluate|report|engine|experiments|cli)\b",
        re.MULTILINE,
    )
    assert [
        f.name
        for f in sorted((PACKAGE / "checkpoint").glob("*.py"))
        if upward.search(f.read_text())
    ] == []
