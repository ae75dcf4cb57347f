"""Library errors name Python arguments; the CLI prints the same errors with its flags."""

from __future__ import annotations

import pytest

from omniquant.cli import CLI_NAMES, main
from omniquant.errors import (
    ModelLoadError,
    RecipeError,
    ReportError,
    arg_ref,
    argument_style,
    cli_style,
)


def test_an_error_renders_in_the_callers_words():
    err = ModelLoadError(f"no config.json; pass {arg_ref('force')}", arg="model", value="/m")
    assert str(err) == "model /m: no config.json; pass force"
    with argument_style(CLI_NAMES):
        assert str(err) == "--model /m: no config.json; pass --force"
    assert str(err) == "model /m: no config.json; pass force"  # the style does not leak


def test_flag_names_that_differ_from_the_argument_and_positionals():
    err = RecipeError("expected key.path=value", arg="overrides", value="'x'")
    with argument_style(CLI_NAMES):
        assert str(err) == "--set 'x': expected key.path=value"
    with argument_style(cli_style(max_memory="--max-memory", path="")):
        assert str(ModelLoadError("no such directory", arg="path", value="/c")) == (
            "/c: no such directory"
        )
        assert str(RecipeError(f"{arg_ref('max_memory')} is empty")) == "--max-memory is empty"


def test_with_arg_relabels_for_a_caller_that_passed_the_value_on():
    inner = ModelLoadError("not a directory", arg="model", value="/x")
    outer = inner.with_arg("candidate", ReportError)
    assert type(outer) is ReportError and outer.value == "/x"
    with argument_style(CLI_NAMES):
        assert str(outer) == "--candidate /x: not a directory"
    assert str(inner) == "model /x: not a directory"


def test_an_error_interpolated_while_a_command_runs_reads_as_flags():
    inner = ModelLoadError("missing", arg="model", value="/m")
    with argument_style(CLI_NAMES):
        outer = RecipeError(f"cannot plan: {inner}")
    assert str(outer) == "cannot plan: --model /m: missing"


def test_quantize_speaks_python_and_the_cli_speaks_flags(tmp_path, capsys):
    from omniquant.quantize import quantize

    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError) as info:
        quantize(missing, "fp8_omni", tmp_path / "out")
    assert str(info.value).startswith(f"model {missing}: directory does not exist")
    rc = main(["quantize", "--model", str(missing), "--recipe", "fp8_omni",
               "--out", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert f"error: --model {missing}: directory does not exist" in err
    with pytest.raises(RecipeError, match=r"^overrides 'nonsense': expected key\.path=value"):
        quantize(tmp_path, "fp8_omni", tmp_path / "out", overrides=["nonsense"])
