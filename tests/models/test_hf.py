"""models.hf: Hugging Face models from a config, random weights, nothing downloaded."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimfx.models import hf

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("arch", hf.names())
def test_build_gives_a_seeded_eval_model_and_inputs_it_runs_on(arch):
    model, inputs = hf.build(arch, seed=3)
    assert not model.training
    assert set(inputs) == ({"pixel_values"} if arch == "vit" else {"input_ids", "attention_mask"})
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[0] == 2 and torch.isfinite(logits).all()
    again, _ = hf.build(arch, seed=3)
    other, _ = hf.build(arch, seed=4)
    sd, sd_again, sd_other = model.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(sd[k], sd_again[k]) for k in sd)
    assert any(not torch.equal(sd[k], sd_other[k]) for k in sd if sd[k].is_floating_point())


def test_config_overrides_and_input_sizes():
    model, inputs = hf.build("bert", batch=3, seq_len=11, num_hidden_layers=1, hidden_size=48)
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 48
    assert inputs["input_ids"].shape == (3, 11) and inputs["input_ids"].max() < model.config.vocab_size
    mask = inputs["attention_mask"]
    assert mask[0].all() and mask.sum(1).min() >= 11 // 2  # padded rows exercise the attention mask
    vit, px = hf.build("vit", batch=4)
    assert px["pixel_values"].shape == (4, 3, vit.config.image_size, vit.config.image_size)
    assert hf.example_inputs(model, batch=1, seq_len=5)["input_ids"].shape == (1, 5)


def test_unknown_arch_names_the_known_ones():
    with pytest.raises(KeyError, match="unknown Hugging Face architecture 'llama'.*bert, distilbert, gpt2, vit"):
        hf.build("llama")


def test_models_package_imports_without_transformers():
    code = """
import sys
sys.modules["transformers"] = None  # as if not installed
from slimfx.models import hf
assert not hf.available()
try:
    hf.build("bert")
except ImportError as e:
    assert "slimfx[hf]" in str(e), e
else:
    raise SystemExit("no ImportError")
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
