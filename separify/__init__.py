"""separify: replace the dense convolutions of a trained network with depthwise-separable approximations.

Public API::

    result = separify.convert(model, example_inputs=x, method="dw-pw", flops=0.5)
    result = separify.convert(model, example_inputs=x, latency=0.6, target="onnxruntime")  # measured on the target
    result.model        # the converted model
    result.layers       # one LayerRecord per conv: rank, FLOPs before/after, error, or why it was skipped
    rep = separify.report(model, result, example_inputs=x, data=images, labels=labels)  # measured before/after
    separify.reporting.print_report(rep)
"""

from separify.config import (Calibration, ConvertConfig, CPSolver, LatencySettings, LatencyTarget, LayerRule,
                             RankSelection)
from separify.core.modules import DwPwConv2d, PwDwPwConv2d, SeparableConv2d
from separify.errors import BadWeightsError, ConfigError, ModelLoadError, SeparifyError, UnsupportedLayerError
from separify.pipeline import convert, convert_onnx
from separify.records import ConvertResult, LayerRecord, Reason
from separify.reporting import Comparison, Report, compare, report
from separify.tuning.ctc import ctc_greedy_targets, ctc_loss, sequence_accuracy
from separify.tuning.finetune import FinetuneResult, distillation_loss, feature_loss, finetune

__version__ = "0.1.0"

__all__ = [
    "convert",
    "convert_onnx",
    "finetune",
    "report",
    "compare",
    "Report",
    "Comparison",
    "distillation_loss",
    "feature_loss",
    "ctc_loss",
    "ctc_greedy_targets",
    "sequence_accuracy",
    "FinetuneResult",
    "ConvertConfig",
    "RankSelection",
    "Calibration",
    "LatencySettings",
    "CPSolver",
    "Reason",
    "ConvertResult",
    "LayerRecord",
    "LayerRule",
    "LatencyTarget",
    "DwPwConv2d",
    "PwDwPwConv2d",
    "SeparableConv2d",
    "SeparifyError",
    "ConfigError",
    "ModelLoadError",
    "BadWeightsError",
    "UnsupportedLayerError",
    "__version__",
]
