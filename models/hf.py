"""Hugging Face transformers models built from a config: random weights, nothing downloaded.

`build("bert" | "distilbert" | "gpt2" | "vit", **config_overrides)` gives an eval-mode model and its
keyword example inputs. The default configs are tiny (2 layers, hidden 32) so tests run in
seconds; pass overrides for real sizes, e.g. `build("bert", **BERT_BASE)`. transformers is an optional
extra (`pip install slimfx[hf]`) and is imported only when a model is built.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

# arch -> (config class, model class, tiny config, input kind)
_ARCHS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "bert": ("BertConfig", "BertForSequenceClassification",
             dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64, num_labels=2), "text"),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification",
                   dict(vocab_size=128, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64,
                        num_labels=2), "text"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             # no KV cache: the model returns logits only; bos/eos inside the tiny vocabulary
             dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False,
                  bos_token_id=0, eos_token_id=0), "text"),
    "vit": ("ViTConfig", "ViTForImageClassification",
            dict(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=64, num_labels=3), "image"),
}

# The published BERT-base shape (bert-base-uncased), for benchmarks.
BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512)


def names() -> list[str]:
    """Architectures `build` knows."""
    return list(_ARCHS)


def available() -> bool:
    """Whether the optional transformers dependency is installed."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("models.hf needs the optional Hugging Face dependency: pip install 'slimfx[hf]' "
                          "(or pip install transformers)") from e
    return transformers


def config(arch: str, **overrides: Any) -> Any:
    """The transformers config of `arch`: the tiny defaults updated with `overrides`."""
    if arch not in _ARCHS:
        raise KeyError(f"unknown Hugging Face architecture {arch!r}; known: {', '.join(_ARCHS)}")
    cfg_cls, _, tiny, _ = _ARCHS[arch]
    return getattr(_transformers(), cfg_cls)(**{**tiny, **overrides})


def build(arch: str, *, seed: int = 0, batch: int = 2, seq_len: int = 8,
          **config_overrides: Any) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """An eval-mode `arch` model with seeded random weights (`_from_config`) and keyword example inputs."""
    cfg = config(arch, **config_overrides)
    model_cls = getattr(_transformers(), _ARCHS[arch][1])
    torch.manual_seed(seed)
    model = model_cls._from_config(cfg).eval()
    return model, example_inputs(model, batch=batch, seq_len=seq_len, seed=seed)


def example_inputs(model: nn.Module, *, batch: int = 2, seq_len: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword inputs for a model from `build`: token ids with an attention mask that pads every row
    but the first (so masking is exercised), or pixel values at the configured image size."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    if cfg.model_type == "vit":
        size = cfg.image_size
        return {"pixel_values": torch.randn(batch, cfg.num_channels, size, size, generator=g)}
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=g)
    lengths = torch.randint(max(1, seq_len // 2), seq_len + 1, (batch,), generator=g)
    lengths[0] = seq_len
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask}


__all__ = ["BERT_BASE", "available", "build", "config", "example_inputs", "names"]
