"""Issue 25's round trip: a native-naming fine-tune, quantized and exported in the released
naming, computes what its native-naming export computes.

The fine-tune is the tiny model with perturbed weights, saved by transformers'
``save_pretrained`` (so its config.json has the native naming a user's fine-tune has). It
is quantized once (the default, released naming); the native-naming export is the same
directory with config.json and preprocessor_config.json written by the adapter in native
naming, which is what ``config_naming="native"`` writes (the shards do not depend on the
naming: ``tests/test_export_pins.py::test_source_naming_writes_the_former_files``). Both
are loaded the ways omniquant loads an export (``ServedModel``: the server's load path,
``load_emulated``: the report's), through transformers' own ``nemotron_h_omni`` classes
with the released naming mapped (``omniquant.models.nemotron_omni.load_config``).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fine_tune(tiny_dir, tmp_path_factory):
    from transformers.models.nemotron_h_omni.modeling_nemotron_h_omni import (
        NemotronH_Omni_Reasoning_V3,
    )

    out = tmp_path_factory.mktemp("ft") / "model"
    model = NemotronH_Omni_Reasoning_V3.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(25)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.01
            p.copy_((p.float() + noise).to(p.dtype))
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy2(tiny_dir / f, out / f)
    return out


@pytest.fixture(scope="module")
def exports(fine_tune, tmp_path_factory):
    from omniquant.models.nemotron_omni import NemotronOmniAdapter
    from omniquant.quantize.pipeline import quantize

    base = tmp_path_factory.mktemp("rt")
    released = quantize(fine_tune, "fp8_omni", base / "released", calib="synthetic").out
    native = base / "native"
    shutil.copytree(released, native)
    cfg = json.loads((released / "config.json").read_text())
    pre = json.loads((fine_tune / "preprocessor_config.json").read_text())
    native_cfg, _ = NemotronOmniAdapter().serving_config(cfg, "native", pre)
    (native / "config.json").write_text(json.dumps(native_cfg, indent=2, sort_keys=True) + "\n")
    shutil.copy2(fine_tune / "preprocessor_config.json", native / "preprocessor_config.json")
    return released, native


def test_fine_tune_has_native_naming_and_other_weights(fine_tune, tiny_dir):
    from omniquant.checkpoint.verify import source_fingerprint
    from omniquant.models.nemotron_omni_naming import naming_of

    assert naming_of(json.loads((fine_tune / "config.json").read_text())) == "native"
    assert source_fingerprint(fine_tune) != source_fingerprint(tiny_dir)


def test_released_export_computes_the_native_exports_logits(exports):
    from omniquant.data.synthetic import synthetic_samples
    from omniquant.endpoint.server import ServedModel
    from omniquant.evaluate.emulated import load_emulated
    from omniquant.models.nemotron_omni_naming import naming_of

    released, native = exports
    assert naming_of(json.loads((released / "config.json").read_text())) == "released"
    assert naming_of(json.loads((native / "config.json").read_text())) == "native"
    served_rel, served_nat = ServedModel(released), ServedModel(native)
    assert served_rel.processor.settings == served_nat.processor.settings
    assert served_rel.loaded.emulation == served_nat.loaded.emulation
    report_rel = load_emulated(released, dtype="float32")
    report_nat = load_emulated(native, dtype="float32")
    checked = 0
    with torch.no_grad():
        for a, b in zip(
            synthetic_samples(report_nat, 4, seed=5), synthetic_samples(report_rel, 4, seed=5)
        ):
            for x, y in ((served_nat.loaded, served_rel.loaded), (report_nat, report_rel)):
                out_x = x.adapter.forward(x.model, a).logits
                out_y = y.adapter.forward(y.model, b).logits
                assert torch.equal(out_x, out_y), a.id
                checked += 1
    assert checked == 8


def test_released_fine_tune_source_computes_the_native_one(fine_tune, tmp_path):
    """The BF16 side: the fine-tune itself rewritten in released naming loads through
    transformers with the mapping and computes the same logits."""
    from omniquant.data.synthetic import synthetic_samples
    from omniquant.models import load_model
    from omniquant.models.nemotron_omni_naming import to_released

    rel = tmp_path / "rel"
    shutil.copytree(fine_tune, rel)
    cfg = json.loads((fine_tune / "config.json").read_text())
    pre = json.loads((fine_tune / "preprocessor_config.json").read_text())
    (rel / "config.json").write_text(json.dumps(to_released(cfg, pre)))
    a_model, b_model = load_model(fine_tune, dtype="float32"), load_model(rel, dtype="float32")
    with torch.no_grad():
        for a, b in zip(
            synthetic_samples(a_model, 3, seed=7), synthetic_samples(b_model, 3, seed=7)
        ):
            assert torch.equal(
                a_model.adapter.forward(a_model.model, a).logits,
                b_model.adapter.forward(b_model.model, b).logits,
            )
