"""Property-based fuzzing of the parsers users feed by hand: whatever the input, the
result is a parsed object or a clean ``OmniquantError``, never another exception.

Targets: the recipe loader (YAML text of a recipe file), ``--set`` overrides, the
calibration manifest parser and validator, and the task-set validator. Inputs mix
arbitrary text with structured near-misses (recipe/manifest keys with wrong types,
``..`` paths, markers) so the fuzzer reaches the validation code, not only the YAML or
JSON syntax errors. Budget: ``MAX_EXAMPLES`` per target (150; more with
``OMNIQUANT_FUZZ_EXAMPLES``), no deadline (a shared CI
machine has noisy timings); fixed derandomized seed so CI runs are reproducible.
"""

from __future__ import annotations

import json
import os
import string
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omniquant.errors import OmniquantError

MAX_EXAMPLES = int(os.environ.get("OMNIQUANT_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
_SCRATCH = Path(tempfile.mkdtemp(prefix="omniquant-fuzz-"))

_RECIPE_KEYS = ["metadata", "name", "description", "model_types", "calibration", "set", "size",
                "seed", "evs_rate", "batch_size", "expert_coverage", "policy", "min_tokens",
                "quantization", "rules", "group", "modules", "format", "kv_cache", "algorithm",
                "nvfp4_block_size", "export", "dtype", ""]  # fmt: skip
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["fp8", "nvfp4", "bf16", "max", "mse", "routed_experts", "router", "*",
                       "synthetic", "error", "warn", "force_all_experts", "nemotron_h_omni"])
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(_RECIPE_KEYS), children, max_size=5),
    max_leaves=20,
)  # fmt: skip
_RECIPE_DICTS = st.fixed_dictionaries(
    {},
    optional={
        "metadata": st.fixed_dictionaries({"name": _VALUES}, optional={"model_types": _VALUES}),
        "calibration": st.dictionaries(st.sampled_from(_RECIPE_KEYS), _VALUES, max_size=4),
        "quantization": st.fixed_dictionaries(
            {"rules": st.lists(st.dictionaries(st.sampled_from(["group", "modules", "format", "x"]),
                                               _VALUES, max_size=3), max_size=3)},
            optional={"kv_cache": _VALUES, "algorithm": _VALUES}),
        "export": _VALUES,
    },
)  # fmt: skip


def _yaml_text(data) -> str:
    try:
        return yaml.safe_dump(data, allow_unicode=True)
    except (yaml.YAMLError, ValueError):
        return "{}"


_RECIPE_TEXT = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=120),  # raw bytes: not always UTF-8
    _RECIPE_DICTS.map(_yaml_text),
    st.lists(st.sampled_from([*(f"{k}:" for k in _RECIPE_KEYS), "  ", "- ", "{", "}", "[", "]",
                              "&a", "*a", "!!python/object:os.system", "\n", "fp8", "1e999",
                              "<<: *a", "%YAML 1.1", "---", "'", '"']), max_size=40).map("".join),
)  # fmt: skip


@FUZZ
@given(text=_RECIPE_TEXT)
def test_recipe_loader_never_crashes(text):
    from omniquant.quantize.recipe import Recipe, load_recipe

    path = _SCRATCH / "fuzz.yaml"
    raw = text if isinstance(text, bytes) else text.encode("utf-8", errors="surrogatepass")
    path.write_bytes(raw)
    try:
        recipe, _ = load_recipe(path)
    except OmniquantError:
        return
    assert isinstance(recipe, Recipe)


_KEY = st.lists(st.sampled_from([*_RECIPE_KEYS, "0", "1", "99", "-1", "x y"]), max_size=4).map(
    ".".join
)
_SET_ITEMS = st.one_of(
    st.text(max_size=40),
    st.tuples(_KEY, st.text(max_size=20)).map("=".join),
    st.tuples(_KEY, _VALUES.map(lambda v: json.dumps(v, default=str))).map("=".join),
)


@FUZZ
@given(items=st.lists(_SET_ITEMS, min_size=1, max_size=3))
def test_set_overrides_never_crash(items):
    from omniquant.quantize.recipe import Recipe, load_recipe

    try:
        recipe, _ = load_recipe("fp8_omni", items)
    except OmniquantError:
        return
    assert isinstance(recipe, Recipe)


_MEDIA = st.one_of(
    st.sampled_from(["a.png", "../a.png", "sub/../../a.png", "/etc/passwd", "", ".", "..",
                     "a.mp4", "a.flac", "dir/", "a\x00b"]),
    st.text(alphabet=string.printable, max_size=12),
)  # fmt: skip
_PROMPT = st.lists(st.sampled_from(["hi ", "<image>", "<video>", "<audio>", "<so_embedding>", "\n",
                                    "{", "}", "é"]), max_size=6).map("".join)  # fmt: skip
_ENTRY = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.text(max_size=6), st.integers(), st.none()),
        "prompt": st.one_of(_PROMPT, st.integers(), st.none()),
        "image": st.one_of(_MEDIA, st.lists(_MEDIA, max_size=2)),
        "images": st.lists(_MEDIA, max_size=2),
        "video": _MEDIA,
        "audio": st.one_of(_MEDIA, st.lists(_MEDIA, max_size=2)),
        "answer": st.one_of(st.text(max_size=6), st.integers(), st.none()),
        "video_fps": st.one_of(st.floats(allow_nan=True), st.integers(), st.text(max_size=3)),
        "video_frames": st.one_of(st.integers(min_value=-3, max_value=10**20), st.floats()),
        "task": st.text(max_size=5),
        "modality": st.sampled_from(["text", "image", "video", "audio", "smell", ""]),
        "metric": st.sampled_from(["exact_match", "multiple_choice", "wer", "bleu", ""]),
        "choices": st.one_of(st.lists(st.text(max_size=4), max_size=3), st.text(max_size=3)),
        "extra": _VALUES,
    },
)


def _line(entry) -> str:
    try:
        return json.dumps(entry, allow_nan=True)
    except ValueError:
        return "{}"


_LINES = st.lists(
    st.one_of(_ENTRY.map(_line), st.text(max_size=30).filter(lambda t: "\n" not in t)),
    max_size=5,
).map(lambda lines: "\n".join(lines) + "\n")


def _set_dir(kind: str, text: str, raw: bytes | None = None) -> Path:
    d = _SCRATCH / kind
    d.mkdir(exist_ok=True)
    (d / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")  # a file that exists but is bad
    name = "manifest.jsonl" if kind == "calib" else "tasks.jsonl"
    (d / name).write_bytes(raw if raw is not None else text.encode("utf-8", "surrogatepass"))
    return d


@FUZZ
@given(text=_LINES, skip_bad=st.booleans(), raw=st.one_of(st.none(), st.binary(max_size=60)))
def test_manifest_parser_never_crashes(text, skip_bad, raw):
    from omniquant.data.manifest import load_manifest, validate_manifest

    d = _set_dir("calib", text, raw)
    for parse in (lambda: load_manifest(d), lambda: validate_manifest(d, skip_bad=skip_bad)):
        try:
            parse()
        except OmniquantError:
            pass


@FUZZ
@given(text=_LINES, raw=st.one_of(st.none(), st.binary(max_size=60)))
def test_task_set_parser_never_crashes(text, raw):
    from omniquant.evaluate.tasks import validate_task_set

    d = _set_dir("tasks", text, raw)
    try:
        validate_task_set(d)
    except OmniquantError:
        pass


@pytest.fixture(autouse=True, scope="module")
def _cleanup_scratch():
    yield
    import shutil

    shutil.rmtree(_SCRATCH, ignore_errors=True)
