"""timm architectures the torchvision list lacks (MLP-Mixer) or builds differently, judged like the sweep.
(timm's own ViT Attention, which splits q, k, v with `unbind`, does not compile yet: docs/third_party.md.)"""

import pytest
import torch

timm = pytest.importorskip("timm")
from bench_third_party import check_model, randomize_zero_heads  # noqa: E402

MODELS = {
    # token-mixing MLPs over transposed patches
    "mixer": lambda: timm.models.mlp_mixer.MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2,
                                                    embed_dim=32),
    "mobilenetv3": lambda: timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_compiles_with_cleanup_and_int8(name):
    torch.manual_seed(0)
    model = randomize_zero_heads(MODELS[name]().eval())  # MlpMixer zeroes its head
    gen = torch.Generator().manual_seed(2)
    row = check_model(model, lambda n: (torch.randn(n, 3, 32, 32, generator=gen),), peer=False)
    assert row["cleanup_ok"], row.get("cleanup_error")
    assert row["int8_ok"], row.get("int8_error")
