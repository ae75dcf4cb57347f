"""Every file an export writes keeps its bytes across refactors (the house issue's rule).

The tiny model (seed 0), the built-in synthetic calibration set and each shipped recipe
give the same shards and the same sidecar files (config.json with its
quantization_config, hf_quant_config.json, the copied tokenizer and processor files)
byte for byte. ``omniquant.json`` is left out: it records timings, versions and paths.
A change that means to alter an export updates these pins in the same commit and says
why in its message. Issue 25 changed ``config.json`` and ``preprocessor_config.json``
(written in the released naming by default); every tensor file kept its pin, and
``config_naming="source"`` still writes the former files byte for byte
(``SOURCE_NAMING_PINS``).
"""

from __future__ import annotations

import hashlib
import json

import pytest

from omniquant.outdir import OUTPUT_MARKER

PINNED = {
    "fp8_omni": {
        "config.json": "b37c404e69ee5448fccce3ad0511a28558f94860d9c7ab5384e1d90fa5cc7e0d",
        "generation_config.json": "e9c42bd8c4e08af12d7090aa6d4ad66489ade8373cd9b7d49f651c60103ce14c",
        "hf_quant_config.json": "25fc13c73794047a079ddada1de2b24dbb58e3e84425f6a6b6f8a4b804b0c196",
        "model.safetensors": "363733deed6d0dd0509aa1dde325cd3dee13405b66ba996c844d673c634fc481",
        "preprocessor_config.json": "cc3927aac107239052dad75c001569acd9441e30335136fc11d5b454b48f273c",
        "tokenizer.json": "8a3b80e5b1b87b93c6519eae6bfaf5fa7b6c5f66f54e23a2cd4233ba04809bab",
        "tokenizer_config.json": "d8b492be197b40a6d4898becc34236bb17847832bcd765a89b48301a71db34dd",
    },
    "nvfp4_omni": {
        "config.json": "90807b5e4aa1871098b6a9c5b1ece83c419b2181a901610029183bdd81acb4c3",
        "generation_config.json": "e9c42bd8c4e08af12d7090aa6d4ad66489ade8373cd9b7d49f651c60103ce14c",
        "hf_quant_config.json": "2a6553ac0e1220386845ef7e81294c66e82f6b2aceca36bb815c6ed56296de5a",
        "model.safetensors": "bd3701228b6cd6b02c93f19cebf0f0634776535c24cdeffa564285803a81f58b",
        "preprocessor_config.json": "cc3927aac107239052dad75c001569acd9441e30335136fc11d5b454b48f273c",
        "tokenizer.json": "8a3b80e5b1b87b93c6519eae6bfaf5fa7b6c5f66f54e23a2cd4233ba04809bab",
        "tokenizer_config.json": "d8b492be197b40a6d4898becc34236bb17847832bcd765a89b48301a71db34dd",
    },
    "fp8_backbone": {
        "config.json": "6e689aa1fc57c50ec4d5c51b1a22f33c5b48cb9588c57ab8ec02a26d947e58f0",
        "generation_config.json": "e9c42bd8c4e08af12d7090aa6d4ad66489ade8373cd9b7d49f651c60103ce14c",
        "hf_quant_config.json": "7443880260c00bf195e856cf6a2a8f16a52bdd9301d218000275483f7c15b48c",
        "model.safetensors": "4f4079855453afae7183eae8ccd152ac9bdd1c6a3ceada9ee20536e9011c1f16",
        "preprocessor_config.json": "cc3927aac107239052dad75c001569acd9441e30335136fc11d5b454b48f273c",
        "tokenizer.json": "8a3b80e5b1b87b93c6519eae6bfaf5fa7b6c5f66f54e23a2cd4233ba04809bab",
        "tokenizer_config.json": "d8b492be197b40a6d4898becc34236bb17847832bcd765a89b48301a71db34dd",
    },
    "nvfp4_aggressive": {
        "config.json": "c7ed206c37c5007875f6e1061d543baae9f813490cb1f44b3d68dd9968ba4485",
        "generation_config.json": "e9c42bd8c4e08af12d7090aa6d4ad66489ade8373cd9b7d49f651c60103ce14c",
        "hf_quant_config.json": "d6c3a5d621d2373ff8cce527eeb89501631439d09d618c63b8eb3a91b74456d4",
        "model.safetensors": "06637d33538ff2c419b0d65cd251b5e57631924260ff328ad138d86a680c15cd",
        "preprocessor_config.json": "cc3927aac107239052dad75c001569acd9441e30335136fc11d5b454b48f273c",
        "tokenizer.json": "8a3b80e5b1b87b93c6519eae6bfaf5fa7b6c5f66f54e23a2cd4233ba04809bab",
        "tokenizer_config.json": "d8b492be197b40a6d4898becc34236bb17847832bcd765a89b48301a71db34dd",
    },
}


@pytest.mark.parametrize("recipe", sorted(PINNED))
def test_export_bytes_are_pinned(quantized, recipe):
    out = quantized(recipe)
    written = sorted(
        p.name for p in out.iterdir()
        if p.suffix in (".safetensors", ".json") and p.name not in ("omniquant.json", OUTPUT_MARKER)
    )  # fmt: skip
    assert written == sorted(PINNED[recipe])
    # The ownership marker (issue #20) is omniquant's, not the checkpoint's: it lists every
    # other entry, so --force may later replace exactly this directory.
    marker = json.loads((out / OUTPUT_MARKER).read_text())
    assert marker == {
        "kind": "checkpoint",
        "entries": sorted(p.name for p in out.iterdir() if p.name != OUTPUT_MARKER),
    }
    got = {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in written}
    assert got == PINNED[recipe]


#: The sidecar files before issue 25, which ``config_naming="source"`` still writes.
SOURCE_NAMING_PINS = {
    "config.json": "f308e3ea0f32f7a80862a477a9b2abf9e76197ffb8939d4e7d46622f35bcce6f",
    "preprocessor_config.json": "b370a08df34b3efc05b34eb12164afac6eea0bdac29f996c07722ef970b5a500",
}


def test_source_naming_writes_the_former_files(quantized, tiny_dir, tmp_path):
    """Same model, recipe and calibration with ``config_naming="source"``: the former
    config files, and the same shards as the released-naming export."""
    from omniquant.quantize.pipeline import quantize

    out = quantize(tiny_dir, "fp8_omni", tmp_path / "src", calib="synthetic", config_naming="source").out
    for name, digest in SOURCE_NAMING_PINS.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
    released = quantized("fp8_omni")
    for name in ("model.safetensors", "hf_quant_config.json"):
        assert (out / name).read_bytes() == (released / name).read_bytes(), name
