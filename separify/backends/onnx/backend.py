"""The ONNX backend: Conv nodes of an ONNX graph rewritten as separable Conv nodes (:mod:`.rewrite`), calibrated
(:mod:`.calibrate`) and timed in onnxruntime, checked by ``onnx.checker`` and by running both graphs."""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import nn

from separify.backends.base import Backend, Found, Kernel, OutputModels
from separify.backends.onnx import calibrate as onnx_calibrate
from separify.backends.onnx.graph import (_EXTERNAL_KEY, OrtModule, _chunks, _fixed_batch, _node_flops,
                                          _pads, _padded, _probe, _taken_names, example_feeds, graph_inputs,
                                          load_onnx, onnx_flops, onnx_params, save_onnx, session,
                                          too_large_in_memory)
from separify.backends.onnx.pairing import source_names
from separify.backends.onnx.rewrite import (_factors, _output_name, _rewrite, _update, _write_layout, check,
                                            kernel_conv, layer_spec, match)
from separify.calibration import as_batches, sensitivity, shape_groups
from separify.calibration.budget import StepTime
from separify.calibration.data import first_samples
from separify.calibration.sensitivity import SAMPLES, unweighted_note
from separify.config import Calibration, ConvertConfig, LatencyTarget
from separify.core import measure
from separify.core.modules import SeparableConv2d
from separify.errors import ConfigError, SeparifyError, first_line
from separify.io.files import few_names
from separify.planning.latency import injected_timings
from separify.records import ConvertResult, LayerRecord, Reason, Skip

__all__ = ["OnnxBackend", "OnnxConvertResult"]


class OnnxBackend(Backend):
    """An ONNX model (a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model``; never modified: the backend works on
    a clone whose tensors are shared, never mutated), converted at ``input_shapes``.

    Layers are named after their nodes (:func:`~separify.backends.onnx.rewrite.match`); the name of the layer each
    came from, where the file records it (:func:`~separify.backends.onnx.source_names`), goes to the result's
    ``source_names``, and ``exclude`` patterns (and rules with ``exclude=True``) match it too."""

    path = "onnx"

    def __init__(self, model: Any, cfg: ConvertConfig, *, input_shapes=None, check_samples: int = 8,
                 threads: int | None = None, timer=None) -> None:
        self.original = load_onnx(model)
        self.work = self.original.clone()
        self.work.meta[_EXTERNAL_KEY] = self.original.meta.get(_EXTERNAL_KEY, False)
        self.feeds = example_feeds(self.work, input_shapes, seed=cfg.seed)
        self.threads, self.check_samples, self.seed = threads, check_samples, cfg.seed
        # one run for the shapes of every Conv/Gemm/MatMul input, hence FLOPs and the layers' input shapes
        counted, self.shapes = _probe(self.work, self.feeds, threads)
        self.flops_before = sum(_node_flops(n, self.shapes) for n in counted)
        self.params_before = onnx_params(self.work)
        self.sites = {s.name: s for s in match(self.work)}
        self.source_names = source_names(self.work)
        self.cfg = cfg
        self.fixed_batch = _fixed_batch(self.work)
        self.value_names = _taken_names(self.work)
        self.batches: list[torch.Tensor] | None = None
        self.samples = 0
        self.replaced: dict[str, tuple[SeparableConv2d, dict[str, ir.Value], np.dtype]] = {}
        self._imported: nn.Module | None = None  # the original in PyTorch (_torch_original)

    # --- discover and check

    def discover(self) -> list[Found]:
        found = []
        for site in self.sites.values():
            spec = layer_spec(site, self.shapes)
            site.input_shape = spec.input_shape
            refusal = check(site)
            params = sum(a.size for a in (site.weight, site.bias) if a is not None)
            shapes = []
            if refusal is None and site.input_shape is not None:
                site.pads = _pads(site.node, site.input_shape, site.weight.shape[2:])
                shapes = [_padded(site.input_shape, site.input_pads)]
            if refusal is None:
                pattern = _excluded_by_source(self.cfg, site.name, self.source_names.get(site.name, site.name))
                if pattern is not None:  # as the pipeline words an exclusion by the layer name
                    refusal = Skip(Reason.EXCLUDED, f"excluded by pattern {pattern!r}")
            found.append(Found(spec, _node_flops(site.node, self.shapes), int(params), shapes, refusal))
        return found

    def kernel(self, name: str, cfg: ConvertConfig) -> Kernel:
        return Kernel(kernel_conv(self.sites[name]))

    # --- calibration

    def set_calibration(self, data: Any, cal: Calibration) -> int:
        if len(self.feeds) != 1:
            raise SeparifyError("ONNX calibration needs a single-input model")
        (name, feed), = self.feeds.items()
        self.batches = as_batches(data, limit=cal.limit, ndim=feed.ndim, input_key=cal.input_key,
                                  max_bytes=int(cal.memory_gb * 2**30))
        dims = graph_inputs(self.work)[0].shape
        for b in self.batches:
            fixed = [] if dims is None else [(i, d) for i, d in enumerate(dims) if isinstance(d, int) and i > 0]
            if any(b.shape[i] != d for i, d in fixed):
                declared = ", ".join(str(d) if isinstance(d, int) else "?" for d in dims)
                raise SeparifyError(f"calibration samples of shape {tuple(b.shape[1:])} do not fit the model's input "
                                    f"{name!r} of shape ({declared})")
        self.samples = sum(len(c) for c in _chunks(self.batches, self.fixed_batch))  # as run: a fixed batch drops
        return self.samples  # the partial last batch

    def observe(self, cands, moments: bool, patches=frozenset(), progress=None):
        if not moments and not patches:
            return {}, {}
        return onnx_calibrate.moments(self.original, [self.sites[c.name] for c in cands],
                                      {c.name: c.kernel for c in cands}, self.batches, self.fixed_batch, self.threads,
                                      moments=moments, patches=patches, progress=progress)

    def _torch_original(self) -> nn.Module:
        """The original imported into PyTorch (:func:`~separify.backends.onnx.finetune.import_torch`), once per
        conversion: the loss-aware weights and the output reconstruction both run it."""
        from separify.backends.onnx.finetune import import_torch

        if self._imported is None:
            self._imported = import_torch(self.original)
        return self._imported

    def sensitivity(self, cands, cal: Calibration, progress=None):
        """Through the model imported into PyTorch (onnx2torch, modules named after the nodes); without it, none."""
        from separify.backends.onnx.finetune import module_name

        names = [c.name for c in cands]
        try:
            module = self._torch_original()
        except SeparifyError as exc:
            return {}, unweighted_note(names, {}, first_line(exc))
        modules = {n for n, _ in module.named_modules()}
        targets = {c.name: t for c in cands for t in [module_name(c.record.bn_folded or c.name)] if t in modules}
        try:
            weights = sensitivity(module, targets, first_samples(self.batches, SAMPLES), loss=cal.loss,
                                  class_dim=cal.class_dim, progress=progress) if targets else {}
        except Exception as exc:  # noqa: BLE001 - the imported graph may not run at other batch sizes
            return {}, unweighted_note(names, {}, f"the imported model did not run ({first_line(exc)})")
        return weights, unweighted_note(names, weights)

    def output_pixels(self, cands) -> dict[str, int]:
        return onnx_calibrate.calibration_pixels(self.work, [self.sites[c.name] for c in cands], self.batches,
                                                 self.fixed_batch, self.threads)

    def refit(self, replacements, records, cfg: ConvertConfig, pixels, progress=None,
              budget: StepTime | None = None):
        return onnx_calibrate.refit(self.original, self.work, self.replaced, self.batches, self.fixed_batch,
                                    cfg.calibration, self.threads, pixels=pixels, seed=cfg.seed,
                                    pads={n: self.sites[n].input_pads for n in self.replaced}, budget=budget)

    def output_models(self, replacements: dict[str, SeparableConv2d]) -> OutputModels | str:
        """Both graphs imported into PyTorch (onnx2torch); the factors are the imported modules of the Conv nodes the
        pass wrote, and go back into each replacement and its initializers (:func:`_update`)."""
        from separify.backends.onnx.finetune import import_torch, imported_convs

        try:
            teacher, student = self._torch_original(), import_torch(self.work)
        except SeparifyError as exc:
            return first_line(exc)
        factors = [(conv, inits[f"{role}.weight"].uses()[0].node.name)  # (replacement's conv, its Conv node)
                   for mod, inits, _ in self.replaced.values() for role, conv in _factors(mod)]
        modules, missing = imported_convs(student, [node for _, node in factors])
        if missing:
            return "onnx2torch did not keep the separable convs as modules"
        pairs = [(conv, modules[node]) for conv, node in factors]

        def write_back() -> None:
            with torch.no_grad():
                for conv, t in pairs:
                    conv.weight.copy_(t.weight)
                    if conv.bias is not None and t.bias is not None:
                        conv.bias.copy_(t.bias)
            for mod, inits, dtype in self.replaced.values():
                _update(inits, mod, dtype)

        params = [p for _, t in pairs for p in t.parameters()]
        values = sum(math.prod(v.shape) for v in self.feeds.values())
        return OutputModels(student, params, teacher, shape_groups(self.batches), write_back, self.fixed_batch,
                            flops_per_value=self.flops_before / max(1, values))

    # --- latency

    def latency_target(self, cfg: ConvertConfig) -> LatencyTarget:
        """ONNX Runtime on the CPU (``"cpu"``, the default target, is read as that); the batch is the model's."""
        target = _onnx_target(cfg)
        batch = self.example_batch
        if target.batch_size is not None and target.batch_size != batch:
            raise ConfigError(f"the latency target's batch size {target.batch_size} differs from the ONNX model's "
                              f"input batch {batch}; give the whole shape with --input-shape (input_shapes=)")
        if target.threads is None and self.threads is not None:
            target = dataclasses.replace(target, threads=self.threads)
        return target

    @property
    def example_batch(self) -> int:
        return int(next(iter(self.feeds.values())).shape[0])

    def time_models(self, models: Sequence[Any], target: LatencyTarget, timer, *, scale: float = 1.0):
        graphs = [self._graph(m) for m in models]
        return _ort_timings(graphs, self.feeds, target, timer, self.threads, scale=scale)

    def _graph(self, which: Any) -> ir.Model:
        if isinstance(which, str) and which == "original":
            return self.original
        if isinstance(which, str) and which == "converted":
            return self.work
        return which

    def fingerprint(self, model: Any) -> str:
        return _fingerprint(self._graph(model))

    @property
    def input_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(v.shape) for v in self.feeds.values()]

    def runnable(self, model: Any) -> OrtModule:
        return OrtModule(self._graph(model), threads=self.threads)

    def observation(self) -> Any:
        return None  # the refit runs the data through onnxruntime again; the moments are the pipeline's

    def use_observation(self, observed: Any) -> None:
        pass

    def trial(self, replacements: dict[str, SeparableConv2d]) -> ir.Model:
        trial = self.original.clone()
        sites = {s.name: s for s in match(trial)}
        names = _taken_names(trial)
        for name, mod in replacements.items():  # in their chosen layouts, as the final graph is written
            dtype = self.sites[name].weight.dtype
            inits = _rewrite(trial, sites[name], mod.eval(), dtype, names)
            _write_layout(trial, inits, mod, dtype, names)
        return trial

    # --- apply and finish

    def apply(self, replacements, records: dict[str, LayerRecord]) -> None:
        for name, mod in replacements.items():
            dtype = self.sites[name].weight.dtype
            inits = _rewrite(self.work, self.sites[name], mod.eval(), dtype, self.value_names)
            self.replaced[name] = (mod, inits, dtype)

    def write_layout(self, name: str, module: SeparableConv2d) -> None:
        _, inits, dtype = self.replaced[name]
        _write_layout(self.work, inits, module, dtype, self.value_names)

    def result(self, records, cfg: ConvertConfig, flops_budget) -> "OnnxConvertResult":
        checked = _check_converted(self.work) if self.replaced else True
        factor_nodes = {name: [u.node.name for u in (v.uses()[0] for k, v in inits.items() if k.endswith(".weight"))]
                        for name, (_m, inits, _d) in self.replaced.items()}
        result = OnnxConvertResult(
            self.work, records, "onnx", cfg, None, self.flops_before, onnx_flops(self.work, self.feeds,
                                                                                   threads=self.threads),
            self.params_before, onnx_params(self.work), flops_budget,
            input_shapes={k: tuple(v.shape) for k, v in self.feeds.items()}, checked=checked,
            factor_nodes=factor_nodes, source_names=dict(self.source_names))
        for msg in _rules_by_source(cfg, self.source_names):
            warnings.warn(msg, stacklevel=2)
            result.warnings.append(msg)
        if self.check_samples and self.replaced:
            result.output_error = _compare(self.original, self.work, self.feeds, self.check_samples, self.seed,
                                           self.replaced, {r.name: r for r in records}, self.threads)
        return result


@dataclass
class OnnxConvertResult(ConvertResult):
    """:class:`~separify.ConvertResult` of the ONNX pass: ``model`` is an ``onnx_ir.Model`` (:meth:`save` writes
    it; ``onnx_ir.to_proto(result.model)`` gives an ``onnx.ModelProto``).

    Extra attributes:
        input_shapes: the shapes the model was converted (and FLOPs counted) at.
        source_names: layer name (the node's, ``rec.name``) → the name of the layer it came from where the file
            records one (e.g. ``layer1.0.conv1`` for torch.onnx's ``node_Conv_12``), else the layer name
            (:func:`~separify.backends.onnx.source_names`); :meth:`source_name` reads it.
        output_error: largest relative error ‖y − ŷ‖/‖y‖ over the graph outputs, original vs converted, both run in
            onnxruntime on ``check_samples`` random inputs (the per-layer ``output_error`` is the same for each
            converted layer's output inside the converted model, so it includes the error of the layers before it).
        checked: the converted model passed ``onnx.checker`` (full check) and strict shape inference; ``False`` for
            models with external data until :meth:`save` has checked the written file.
    """

    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    output_error: float | None = None
    checked: bool = False
    factor_nodes: dict[str, list[str]] = field(default_factory=dict)  # layer → names of the Conv nodes written
    source_names: dict[str, str] = field(default_factory=dict)

    def source_name(self, layer: str | LayerRecord) -> str:
        """The name of the layer ``layer`` (a name or a record) came from, else its own (node) name."""
        name = layer if isinstance(layer, str) else layer.name
        return self.source_names.get(name, name)

    def save(self, path: str | os.PathLike) -> list[Path]:
        """Write the converted model atomically (see :func:`save_onnx`); returns the files written. A model too large
        to be checked in memory is checked from the written file before it is renamed into place."""
        written = save_onnx(self.model, path, check=not self.checked)
        self.checked = True
        return written

    def to_dict(self) -> dict[str, Any]:
        doc = super().to_dict()
        doc.update(input_shapes={k: list(v) for k, v in self.input_shapes.items()}, output_error=self.output_error,
                   checked=self.checked)
        for layer in doc["layers"]:
            layer["source_name"] = self.source_name(layer["name"])
        return doc


def _excluded_by_source(cfg: ConvertConfig, layer: str, source: str) -> str | None:
    """The pattern that leaves ``layer`` dense by its source name ``source``: an ``exclude`` pattern matching it
    (exclusions come first, as for layer names), else the first rule matching it when that rule excludes and no
    rule matches the layer name itself (whose own rule wins, as the pipeline applies it); else ``None``."""
    own = cfg.rule_for(layer)
    if source == layer or (own is not None and own.exclude):
        return None  # the pipeline matches the layer name
    pattern = next((p for p in cfg.exclude if fnmatch.fnmatchcase(source, p)), None)
    if pattern is not None:
        return pattern
    if own is not None:
        return None
    rule = cfg.rule_for(source)
    return rule.pattern if rule is not None and rule.exclude else None


def _rules_by_source(cfg: ConvertConfig, names: dict[str, str]) -> list[str]:
    """A warning for each rule that sets a form or rank and matches layers by their source names only: rules are
    applied by layer (node) name; only exclusions also match source names."""
    msgs = []
    for rule in cfg.rules:
        if rule.exclude:
            continue
        by_source = [s for layer, s in names.items() if s != layer and rule.matches(s)]
        if by_source and not any(rule.matches(layer) for layer in names):
            msgs.append(f"rule {rule.pattern!r} matches only the source names of layers of this ONNX model "
                        f"({few_names(by_source)}); "
                        "rules that set a form or rank match the node names (the notes of the report's layer rows "
                        "give them); only exclusions match either name")
    return msgs


def _onnx_target(cfg: ConvertConfig) -> LatencyTarget:
    """The latency target of an ONNX model: ONNX Runtime on the CPU (``"cpu"``, the default target, is read as
    that); the PyTorch CUDA target does not apply."""
    target = cfg.target
    if target.backend == "cuda":
        raise ConfigError("an ONNX model is timed in ONNX Runtime on the CPU (--target onnxruntime); the cuda target "
                          "times PyTorch models")
    if target.backend == "cpu":
        try:
            target = dataclasses.replace(target, backend="onnxruntime")
        except ConfigError as exc:
            raise ConfigError(f"an ONNX model is timed in ONNX Runtime: {exc}") from None
    return target


def _ort_timings(models: Sequence[ir.Model], feeds, target: LatencyTarget, timer, threads, *,
                 scale: float = 1.0) -> list[measure.Timing]:
    """Whole-graph :class:`~separify.core.measure.Timing` of each model in ONNX Runtime (interleaved; ``scale`` × the
    usual run time), or from an injected ``timer(modules, input_shape, target)``, which gets the graphs as
    :class:`OrtModule`."""
    inputs = [torch.from_numpy(np.ascontiguousarray(feeds[v.name])) for v in graph_inputs(models[0])]
    if timer is not None:  # checked as for torch models
        shape = (target.batch_size or inputs[0].shape[0], *inputs[0].shape[1:])
        return injected_timings([OrtModule(m, threads=threads) for m in models], shape, target, timer,
                                "onnxruntime-cpu")
    try:
        with tempfile.TemporaryDirectory(prefix="separify-latency-") as tmp:
            paths = []
            for i, m in enumerate(models):
                paths.append(Path(tmp) / f"model{i}.onnx")
                save_onnx(m, paths[-1])
            timings = measure.time_onnxruntime([str(p) for p in paths], inputs, threads=target.threads or threads,
                                               min_run_time=scale * max(20 * target.min_run_time, 1.0))
    except Exception as exc:  # noqa: BLE001 - one clear message
        raise SeparifyError(f"could not time the whole model on {target.describe()}: {first_line(exc)}") from None
    return timings if isinstance(timings, list) else [timings]


def _fingerprint(model: ir.Model) -> str:
    """A hash of a graph's structure: every node's domain, op type, attributes and wiring (value names replaced by
    their order of first use) and every initializer's shape and dtype; not the weights."""
    names: dict[str, str] = {}

    def canon(v) -> str:
        return "" if v is None else names.setdefault(v.name, f"v{len(names)}")

    def attr(a) -> str:
        value = a.value
        if hasattr(value, "shape") and hasattr(value, "dtype"):  # a tensor attribute: its type, not its data
            return f"tensor{tuple(value.shape)}:{value.dtype}"
        return repr(value)

    h = hashlib.sha256()
    for v in model.graph.inputs:
        h.update(f"in {canon(v)} {v.shape} {v.dtype}".encode())
    for node in model.graph:
        attrs = ",".join(f"{k}={attr(a)}" for k, a in sorted(node.attributes.items()))
        h.update(f"{node.domain}:{node.op_type}({','.join(canon(i) for i in node.inputs)})"
                 f"->{','.join(canon(o) for o in node.outputs)}[{attrs}]".encode())
    for name, v in model.graph.initializers.items():
        h.update(f"init {canon(v)} {v.shape} {v.dtype}".encode())
    return h.hexdigest()


def _check_converted(model: ir.Model) -> bool:
    """Full ``onnx.checker`` and strict shape inference on the converted model (in memory below 2 GB)."""
    if too_large_in_memory(model):
        return False  # checked from the written file by OnnxConvertResult.save; in memory it could exceed 2 GB
    proto = ir.serde.serialize_model(model)
    try:
        onnx.checker.check_model(proto, full_check=True)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except Exception as exc:  # noqa: BLE001
        raise SeparifyError(f"the converted model fails onnx.checker ({first_line(exc)}); this is a separify bug, "
                            "please report it with the model") from None
    return True


def _compare(original: ir.Model, converted: ir.Model, feeds, samples: int, seed: int, replaced, records,
             threads) -> float:
    """Run both models in onnxruntime on ``samples`` random inputs (the example's shape); set each converted layer's
    ``output_error`` and return the largest relative error over the graph outputs."""
    layer_outs = {name: _output_name(inits) for name, (_m, inits, _d) in replaced.items()}
    extra = list(layer_outs.values())
    sessions = [session(m, extra, threads=threads) for m in (original, converted)]
    final = [o.name for o in original.graph.outputs]
    fixed = _fixed_batch(original)
    num = {n: 0.0 for n in final + extra}
    den = {n: 0.0 for n in final + extra}
    gen = np.random.default_rng(seed + 1)
    done = 0
    while done < samples:
        batch = {k: gen.standard_normal((fixed or min(samples - done, 8), *v.shape[1:])).astype(v.dtype)
                 if v.ndim else v for k, v in feeds.items()}
        ref, new = (dict(zip(final + extra, s.run(final + extra, batch))) for s in sessions)
        for n in num:
            a, b = np.asarray(ref[n], np.float64), np.asarray(new[n], np.float64)
            num[n] += float(((a - b) ** 2).sum())
            den[n] += float((a**2).sum())
        done += next(iter(batch.values())).shape[0] if batch else samples
    rel = {n: math.sqrt(num[n] / den[n]) if den[n] > 0 else math.sqrt(num[n]) for n in num}
    for name, out in layer_outs.items():
        records[name].output_error = rel[out]
    return max(rel[n] for n in final)
