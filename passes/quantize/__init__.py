"""Quantization: observers, calibration, the `quantize` pass (int8 static/dynamic, fixed-point, sign),
QAT with a straight-through estimator, cross-layer equalization, bias correction, sensitivity analysis."""

from slimfx.passes.quantize import ops  # noqa: F401  (registers fake_quantize)
from slimfx.passes.quantize.equalize import BiasCorrection, Equalize
from slimfx.passes.quantize.observers import (
    CALIBRATION_METHODS,
    Calibration,
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    QParams,
    make_observer,
    pow2_qparams,
    qparams_from_range,
)
from slimfx.passes.quantize.ptq import Quantize, Scheme
from slimfx.passes.quantize.sensitivity import QuantSensitivity, layer_sensitivity
from slimfx.passes.quantize.smooth import SmoothQuant
from slimfx.passes.quantize.tune import tune
from slimfx.passes.quantize.weight_only import QuantizeWeights

__all__ = ["Observer", "MinMaxObserver", "MovingAverageMinMaxObserver", "HistogramObserver", "PercentileObserver",
           "EntropyObserver", "MSEObserver", "QParams", "make_observer", "qparams_from_range", "pow2_qparams",
           "CALIBRATION_METHODS", "Calibration", "Quantize", "Scheme", "Equalize", "BiasCorrection", "QuantSensitivity",
           "layer_sensitivity", "tune", "QuantizeWeights", "SmoothQuant"]
