"""Calibration: fit each replacement to the original layer's outputs on real inputs."""

from separify.calibration.calibrate import *  # noqa: F401,F403
from separify.calibration.calibrate import (PIXELS_PER_INPUT, LayerFit, Observation, PatchStatistics,  # noqa: F401
                                            PointwiseRefit, _accumulate, _Moments, als_dw_pw, als_fit, als_runs,
                                            als_skip_reason, as_batches, observe, refit_pointwise, scarce,
                                            scarce_note)
