

def test_generated_samples_shrink_with_model_cost_but_never_below_the_floor():
    from slimfx.data import GENERATED_SAMPLES, MIN_GENERATED_SAMPLES, generated_sample_count

    assert generated_sample_count(1e6) == GENERATED_SAMPLES == 256
    assert generated_sample_count(0) == GENERATED_SAMPLES
    assert generated_sample_count(4e8) == 160  # 256 * 0.25 GMAC / 0.4 GMAC = 160, a multiple of 32
    assert generated_sample_count(1.8e9) == MIN_GENERATED_SAMPLES["per_sample"] == 128  # a ResNet-18 at 224x224
    assert generated_sample_count(1.8e9, per_sample_gate=False) == 32  # SQNR pools every output value
    counts = [generated_sample_count(m) for m in (1e8, 3e8, 5e8, 1e9, 1e10)]
    assert counts == sorted(counts, reverse=True) and all(c % 32 == 0 for c in counts)
