"""timm architectures the torchvision list lacks (MLP-Mixer) or builds differently, judged like the sweep."""

import pytest
import torch

timm = pytest.importorskip("timm")
from bench_third_party import check_model  # noqa: E402

MODELS = {
    # token-mixing MLPs over transposed patches
    "mixer": lambda: timm.models.mlp_mixer.MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2,
                                                    embed_dim=32),
    # DeiT-style encoder with timm's own Attention (fused qkv, F.scaled_dot_product_attention)
    "deit": lambda: timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, num_classes=10,
                                                                     embed_dim=32, depth=2, num_heads=2),
    "mobilenetv3": lambda: timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_compiles_with_cleanup_and_int8(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    gen = torch.Generator().manual_seed(2)
    row = check_model(model, lambda n: (torch.randn(n, 3, 32, 32, generator=gen),), peer=False)
    assert row["cleanup_ok"], row.get("cleanup_error")
    assert row["int8_ok"], row.get("int8_error")
