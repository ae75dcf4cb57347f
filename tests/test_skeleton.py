"""Package set-up, import cost, error handling of the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from omniquant.cli import main


def test_import_is_cheap():
    code = (
        "import sys, omniquant, omniquant.cli, omniquant.errors\n"
        "bad = [m for m in ('tensorrt_llm', 'modelopt', 'torch.cuda') if m in sys.modules]\n"
        "import torch\n"
        "print(bad, torch.cuda.is_initialized())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] False"


def test_bad_model_path(tmp_path, capsys):
    rc = main(["quantize", "--model", str(tmp_path / "nope"), "--recipe", "fp8_omni",
               "--out", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert f"--model {tmp_path / 'nope'}: directory does not exist" in err
    assert "Traceback" not in err


def test_non_omni_model_dir(tmp_path, capsys):
    d = tmp_path / "llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    rc = main(["quantize", "--model", str(d), "--recipe", "fp8_omni", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "model_type 'llama' (architectures []) is not supported" in err
    assert "model types ['nemotron_h_omni']" in err


def test_dir_without_config(tmp_path, capsys):
    rc = main(
        ["quantize", "--model", str(tmp_path), "--recipe", "fp8_omni", "--out", str(tmp_path / "o")]
    )
    assert rc == 2
    assert "no config.json" in capsys.readouterr().err


def test_existing_output_dir(tiny_dir, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    rc = main(["quantize", "--model", str(tiny_dir), "--recipe", "fp8_omni", "--out", str(out)])
    assert rc == 2
    assert f"--out {out}: already exists; pass --force to overwrite it." in capsys.readouterr().err


def test_unknown_recipe_name(tiny_dir, tmp_path, capsys):
    rc = main(
        ["quantize", "--model", str(tiny_dir), "--recipe", "fp9_omni", "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert (
        "--recipe fp9_omni: unknown recipe name; built-in recipes are fp8_backbone, fp8_omni, nvfp4_aggressive, nvfp4_omni"
        in err
    )


def test_usage_error_exit_code(capsys):
    assert main(["make-tiny"]) == 2  # --out missing


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("make-tiny", "plan", "quantize", "inspect", "recipes", "report", "cliff", "build-engine"):
        assert command in out, command


def test_recipes_lists_the_builtins_with_descriptions(capsys):
    from omniquant.quantize.recipe import builtin_recipes

    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = sorted(builtin_recipes())
    assert names == ["fp8_backbone", "fp8_omni", "nvfp4_aggressive", "nvfp4_omni"]
    for name in names:
        (line,) = [x for x in lines if x.split() and x.split()[0] == name]
        assert len(line.split()) > 1, f"{name}: no description"


@pytest.mark.parametrize(
    ("raised", "code", "message"),
    [("interrupt", 130, "interrupted"), ("exit3", 3, None), ("exit0", 0, None)],
)
def test_exit_codes_survive_the_cli(monkeypatch, tmp_path, capsys, raised, code, message):
    """An interrupt or a command's own non-zero exit must not end as exit 0."""
    import typer

    import omniquant.demo.tiny

    def fake_make_tiny(*_a, **_k):
        if raised == "interrupt":
            raise KeyboardInterrupt
        raise typer.Exit(code=3 if raised == "exit3" else 0)

    monkeypatch.setattr(omniquant.demo.tiny, "make_tiny", fake_make_tiny)
    assert main(["make-tiny", "--out", str(tmp_path / "t")]) == code
    err = capsys.readouterr().err
    assert (message in err) if message else "Traceback" not in err


def test_paths_with_brackets_print_as_they_are(tmp_path, capsys):
    out = tmp_path / "runs[" / "exp]" / "[v2]"
    out.parent.mkdir(parents=True)
    assert main(["make-tiny", "--out", str(out)]) == 0
    assert f"wrote tiny nemotron_h_omni checkpoint to {out}" in capsys.readouterr().out


def test_make_tiny_force_refuses_a_file(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("not a checkpoint")
    assert main(["make-tiny", "--out", str(target), "--force"]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert target.read_text() == "not a checkpoint"
