"""The backend interface: the few steps of a conversion that differ between model types.

The pipeline (:mod:`separify.pipeline`) runs discover → check → plan → decompose → apply → calibrate → layouts →
verify once for every model type; a backend knows how to find the convs of its model type, give each one's kernel
as an ``nn.Conv2d``, measure its calibration inputs, time whole models on a target, and write the chosen
replacements (:class:`~separify.core.modules.SeparableConv2d` modules, the same for every backend) into its model.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from separify.calibration import LayerFit, PatchStatistics
from separify.calibration.budget import StepTime
from separify.config import Calibration, ConvertConfig, LatencyTarget
from separify.core.decompose import InputCovariance
from separify.core.measure import Timing
from separify.core.modules import SeparableConv2d
from separify.planning.plan import Candidate
from separify.records import ConvertResult, LayerRecord, LayerSpec, Skip

__all__ = ["Backend", "Found", "Kernel", "OutputModels"]


@dataclass
class Found:
    """A conv site as discovered: its description, cost, the input shape(s) it runs at on the example input (empty:
    not reached) and why the backend refuses it (``None``: convertible)."""

    spec: LayerSpec
    flops: int
    params: int
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    refusal: Skip | None = None


@dataclass
class Kernel:
    """The conv to decompose for one site: ``conv`` (BatchNorm folded in where ``bn_folded`` names it), and a note
    when a BatchNorm that follows it could not be folded."""

    conv: nn.Conv2d
    bn_folded: str | None = None
    bn_note: str | None = None


@dataclass
class OutputModels:
    """What the output reconstruction (:mod:`separify.calibration.output`) trains: the converted model as a PyTorch
    ``student`` whose ``params`` (the replacements' factors) move, the original as ``teacher`` (a callable on
    tensors), the calibration samples in ``groups`` (one tensor per sample shape), ``write_back()``, which puts the
    trained factors into the backend's model (nothing where ``student`` is that model), the batch size both
    models are fixed to (``None``: any), the original's forward FLOPs per input value (for the stage's precision
    rule; 0: unknown) and whether image inputs go channels-last (the model runs in that layout)."""

    student: nn.Module
    params: list[nn.Parameter]
    teacher: Callable[[torch.Tensor], Any]
    groups: list[torch.Tensor]
    write_back: Callable[[], None] = lambda: None
    fixed_batch: int | None = None
    flops_per_value: float = 0.0
    channels_last: bool = False


class Backend(abc.ABC):
    """One model type. Built around one input model (never modified unless ``inplace``); used once."""

    path: str = ""  # "fx", "module-tree", "onnx"
    trace_error: str | None = None
    flops_before: int = 0
    params_before: int = 0

    # --- discover and check

    @abc.abstractmethod
    def discover(self) -> list[Found]:
        """Every conv site in graph order."""

    @abc.abstractmethod
    def kernel(self, name: str, cfg: ConvertConfig) -> Kernel:
        """The kernel of a convertible site, as an ``nn.Conv2d`` (BatchNorm folded where the backend can)."""

    # --- calibration

    @abc.abstractmethod
    def set_calibration(self, data: Any, cal: Calibration) -> int:
        """Check and keep calibration data (:func:`~separify.calibration.as_batches`: at most ``cal.limit``
        samples, the input picked by ``cal.input_key``); returns the samples that will be used."""

    @abc.abstractmethod
    def observe(self, cands: Sequence[Candidate], moments: bool, patches: frozenset[str] = frozenset(),
                progress: Callable[[int, int], None] | None = None
                ) -> tuple[dict[str, InputCovariance], dict[str, PatchStatistics]]:
        """One pass over the calibration data through the original model: each candidate's input moments (where
        ``moments``), the patch statistics of input and output of the candidates in ``patches`` (for
        ``method="auto"``, :func:`~separify.calibration.observation.add_patches`) and whatever the refit needs
        later; ``progress(done, total)`` after each batch, in samples."""

    @abc.abstractmethod
    def sensitivity(self, cands: Sequence[Candidate], cal: Calibration,
                    progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, float], str | None]:
        """Per candidate, how much an error in its output moves the model's loss
        (:func:`~separify.calibration.sensitivity`, ``cal.loss`` over ``cal.class_dim``, on the first calibration
        samples), and a warning where some or all could not be measured (those are missing from the dict);
        ``progress(done, total)`` as :func:`~separify.calibration.sensitivity` calls it, in passes (never called
        when nothing is measured)."""

    @abc.abstractmethod
    def output_pixels(self, cands: Sequence[Candidate]) -> dict[str, int]:
        """Per candidate, the pixels of its output over all calibration samples."""

    @abc.abstractmethod
    def refit(self, replacements: dict[str, SeparableConv2d], records: dict[str, LayerRecord], cfg: ConvertConfig,
              pixels: dict[str, int], progress=None, budget: StepTime | None = None) -> list[LayerFit]:
        """Fit each applied replacement to the original layer's outputs on the calibration data, in graph order,
        on the converted model's own inputs; the factors are updated in the backend's model. The layer-wise
        reconstruction's steps share the ``budget`` of their time (:mod:`~separify.calibration.budget`)."""

    @abc.abstractmethod
    def output_models(self, replacements: dict[str, SeparableConv2d]) -> OutputModels | str:
        """The models of the output reconstruction after :meth:`refit`, or why it cannot run on this model."""

    # --- latency

    @abc.abstractmethod
    def latency_target(self, cfg: ConvertConfig) -> LatencyTarget:
        """The target candidates are timed on (checked for this model type)."""

    @property
    @abc.abstractmethod
    def example_batch(self) -> int:
        """The batch size of the example input."""

    @abc.abstractmethod
    def time_models(self, models: Sequence[Any], target: LatencyTarget, timer, *, scale: float = 1.0) -> list[Timing]:
        """Whole models of this backend's type (``"original"``, ``"converted"`` or a model) timed on ``target``
        (interleaved), or by an injected ``timer``."""

    @abc.abstractmethod
    def fingerprint(self, model: Any) -> str:
        """A hash of what the speed of a model (``"original"``, ``"converted"`` or a model) depends on: its
        structure, layer configurations and tensor shapes, not its weights. Equal for a trial and the converted
        model it plans, so that a timing is measured once and cached."""

    @property
    @abc.abstractmethod
    def input_shapes(self) -> list[tuple[int, ...]]:
        """The example inputs' shapes (part of a whole-model timing's cache key)."""

    @abc.abstractmethod
    def runnable(self, model: Any) -> Any:
        """``model`` (``"original"``, ``"converted"`` or a model) as a callable on tensors, for ``evaluate``."""

    @abc.abstractmethod
    def observation(self) -> Any:
        """What :meth:`observe` measured that :meth:`refit` uses, to be handed to another backend of the same
        model (:meth:`use_observation`) instead of measured again."""

    @abc.abstractmethod
    def use_observation(self, observed: Any) -> None:
        """Take what another backend of the same model and data observed (:meth:`observation`)."""

    @abc.abstractmethod
    def trial(self, replacements: dict[str, SeparableConv2d]) -> Any:
        """A copy of the original with these replacements (untrained factors) in their layouts, for timing."""

    # --- apply and finish

    @abc.abstractmethod
    def apply(self, replacements: dict[str, SeparableConv2d], records: dict[str, LayerRecord]) -> None:
        """Write the replacements into the working model (BatchNorms folded into them are removed)."""

    @abc.abstractmethod
    def write_layout(self, name: str, module: SeparableConv2d) -> None:
        """Write a replacement again after its layout changed (same function, other channel order or width)."""

    @abc.abstractmethod
    def result(self, records: list[LayerRecord], cfg: ConvertConfig, flops_budget: int | None) -> ConvertResult:
        """The result: converted model, records, whole-model FLOPs and parameters after; verified where the
        backend verifies (ONNX: checker and both models run in onnxruntime)."""
