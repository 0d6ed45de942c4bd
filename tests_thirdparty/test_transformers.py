"""transformers encoders and decoders built from small configs (slimfx.models.hf) compile with `cleanup` and
`int8` from keyword inputs, judged like the sweep (ONNX against eager and against the fake-quant module)."""

import pytest

pytest.importorskip("transformers")
from bench_third_party import check_model  # noqa: E402

from slimfx.models import hf  # noqa: E402


@pytest.mark.parametrize("arch", hf.names())
def test_compiles_with_cleanup_and_int8(arch):
    model, _ = hf.build(arch, seed=0)
    seeds = iter(range(100))
    row = check_model(model, lambda n: hf.example_inputs(model, batch=n, seed=next(seeds)), peer=False)
    assert row["cleanup_ok"], row.get("cleanup_error")
    assert row["int8_ok"], row.get("int8_error")
