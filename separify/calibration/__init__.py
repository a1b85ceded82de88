"""Calibration: fit each replacement to the original layer's outputs on real inputs.

Weight-space decomposition minimises ‖W − Ŵ‖, which treats every input direction as equally likely. On real data
the inputs of a layer are correlated, and what matters is the error of the layer's output. Calibration works in two
passes over the data (:func:`as_batches` normalises it to a list of input batches):

1. :func:`observe` (:mod:`~separify.calibration.observation`) runs the *original* model once. Forward hooks
   accumulate, for every candidate conv, the second moments of its real inputs
   (:class:`~separify.core.decompose.InputCovariance`: ``M×M`` over pixels, ``M×P×P`` over the patches the conv
   reads) and keep the output of its target (the conv, or the BatchNorm folded into it). The moments drive the
   whitened decomposition and the data-aware rank allocation.
2. :func:`refit_pointwise` (:mod:`~separify.calibration.refit_pass`) runs the *converted* model once, on all
   calibration samples as one batch. When the forward reaches a replacement, its depthwise conv and last 1×1 conv
   are first fitted jointly to the kept output by alternating least squares (:mod:`~separify.calibration.als`,
   ``calib_als > 0``), optionally reconstructed by Adam steps on all factors
   (:mod:`~separify.calibration.reconstruct`, ``calib_steps > 0``), and finally its last 1×1 conv is refitted by
   linear least squares on the input it really gets (:mod:`~separify.calibration.refit`). The weights change
   before the forward moves on, so every later layer sees, and corrects, the error left upstream.

Between the two, :func:`sensitivity` (:mod:`~separify.calibration.sensitivity`) weighs each layer's predicted error
by its effect on the model's output, for the rank allocation (``calib_loss_aware``).

Scarce data (:func:`scarce`): with fewer than :data:`PIXELS_PER_INPUT` calibration pixels per input channel of a
layer's last 1×1 conv, the refit's ridge is chosen by 2-fold cross-validation, and the alternating least squares and
the reconstruction are skipped; the layer's note says so.

Memory: the kept outputs (every converted layer's output for every sample, in the precision the pass gave it:
float32, bfloat16 under bfloat16 autocast, float64 for float64 models; bounded by ``calib_memory_gb``), one forward
pass of the converted model on all samples at once, and ``(C+1)²`` float64 statistics for one layer at a time (with
ALS also its ``(C·P)²`` patch Gram, at most 512 MiB: larger layers skip ALS with a note). A module called several
times in one forward pass is calibrated on its first call.
The three passes of the PyTorch path (observation, loss-aware weights, refit) run inside :func:`reuse_freed_memory`
(:mod:`~separify.calibration.memory`).
"""

from separify.calibration.als import PatchStatistics, als_dw_pw, als_fit, als_runs, als_skip_reason
from separify.calibration.data import as_batches, shape_groups
from separify.calibration.memory import reuse_freed_memory
from separify.calibration.observation import Observation, observe
from separify.calibration.observation import _accumulate, _Moments  # noqa: F401 - the ONNX pass streams moments
from separify.calibration.refit import PIXELS_PER_INPUT, LayerFit, PointwiseRefit, scarce, scarce_note
from separify.calibration.refit_pass import refit_pointwise
from separify.calibration.sensitivity import sensitivity

__all__ = ["LayerFit", "Observation", "PatchStatistics", "PointwiseRefit", "als_dw_pw", "als_fit", "als_skip_reason",
           "als_runs", "as_batches", "observe", "refit_pointwise", "reuse_freed_memory", "scarce",
           "scarce_note", "sensitivity", "shape_groups", "PIXELS_PER_INPUT"]
