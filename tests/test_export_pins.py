"""Every file an export writes keeps its bytes across refactors (the house issue's rule).

The tiny model (seed 0), the built-in synthetic calibration set and each shipped recipe
give the same shards and the same sidecar files (config.json with its
quantization_config, hf_quant_config.json, the copied tokenizer and processor files)
byte for byte. ``omniquant.json`` is left out: it records timings, versions and paths.
A change that means to alter an export updates these pins in the same commit and says
why in its message.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from omniquant.outdir import OUTPUT_MARKER

PINNED = {
    "fp8_omni": {
        "config.json": "f308e3ea0f32f7a80862a477a9b2abf9e76197ffb8939d4e7d46622f35bcce6f",
        "generation_config.json": "e9c42bd8c4e08af12d7090aa6d4ad66489ade8373cd9b7d49f651c60103ce14c",
        "hf_quant_config.json": "25fc13c73794047a079ddada1de2b24dbb58e3e84425f6a6b6f8a4b804b0c196",
        "model.safetensors": "363733deed6d0dd0509aa1dde325cd3dee13405b66ba996c844d673c634fc481",
        "preprocessor_config.json": "b370a08df34b3efc05b34eb12164afac6eea0bdac29f996c07722ef970b5a500",
        "tokenizer.json": "8a3b80e5b1b87b93c6519eae6bfaf5fa7b6c5f66f54e23a2cd4233ba04809bab",
        "tokenizer_config.json": "d8b492be197b40a6d4898becc34236bb17847832bcd765a89b48301a71db34dd",
    },
    "nvfp4_omni": {
        "config.json": "a68c1e927bccc1521e624267add82eddec95cef6c4f391b390f71e0adbd94f60",
        "generation_config.json": "e9c42bd8c4e08af12d7090aa6d4ad66489ade8373cd9b7d49f651c60103ce14c",
        "hf_quant_config.json": "2a6553ac0e1220386845ef7e81294c66e82f6b2aceca36bb815c6ed56296de5a",
        "model.safetensors": "bd3701228b6cd6b02c93f19cebf0f0634776535c24cdeffa564285803a81f58b",
        "preprocessor_config.json": "b370a08df34b3efc05b34eb12164afac6eea0bdac29f996c07722ef970b5a500",
        "tokenizer.json": "8a3b80e5b1b87b93c6519eae6bfaf5fa7b6c5f66f54e23a2cd4233ba04809bab",
        "tokenizer_config.json": "d8b492be197b40a6d4898becc34236bb17847832bcd765a89b48301a71db34dd",
    },
    "fp8_backbone": {
        "config.json": "5bad6f2c256268677cba53ee0cd6d054f1e700e46dcf6f7535f73543632227ad",
        "generation_config.json": "e9c42bd8c4e08af12d7090aa6d4ad66489ade8373cd9b7d49f651c60103ce14c",
        "hf_quant_config.json": "7443880260c00bf195e856cf6a2a8f16a52bdd9301d218000275483f7c15b48c",
        "model.safetensors": "4f4079855453afae7183eae8ccd152ac9bdd1c6a3ceada9ee20536e9011c1f16",
        "preprocessor_config.json": "b370a08df34b3efc05b34eb12164afac6eea0bdac29f996c07722ef970b5a500",
        "tokenizer.json": "8a3b80e5b1b87b93c6519eae6bfaf5fa7b6c5f66f54e23a2cd4233ba04809bab",
        "tokenizer_config.json": "d8b492be197b40a6d4898becc34236bb17847832bcd765a89b48301a71db34dd",
    },
    "nvfp4_aggressive": {
        "config.json": "570fc925e35d001e0f4f80d7046760adf6590049aaf073214360062bff425dc8",
        "generation_config.json": "e9c42bd8c4e08af12d7090aa6d4ad66489ade8373cd9b7d49f651c60103ce14c",
        "hf_quant_config.json": "d6c3a5d621d2373ff8cce527eeb89501631439d09d618c63b8eb3a91b74456d4",
        "model.safetensors": "06637d33538ff2c419b0d65cd251b5e57631924260ff328ad138d86a680c15cd",
        "preprocessor_config.json": "b370a08df34b3efc05b34eb12164afac6eea0bdac29f996c07722ef970b5a500",
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
