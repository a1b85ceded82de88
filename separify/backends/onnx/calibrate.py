"""Calibration of an ONNX conversion, run in onnxruntime.

onnxruntime runs the original model with the inputs of every candidate Conv as extra outputs, which gives their input
moments (data-aware rank allocation, optional whitening). Then, layer by layer in graph order, both models run on the
calibration data — the original up to the layer's output, the converted model (every earlier layer already refitted)
up to the input of the replacement's last 1×1 conv, each cut to the nodes it needs — and that conv is refitted by
streaming least squares (after the alternating least squares of the depthwise and last 1×1 conv, statistics streamed
the same way, and the layer-wise reconstruction of the replacement in PyTorch on its inputs and outputs), as the torch
backend does in its single forward pass. Cost: about one forward pass of the model over the data per converted layer
(half, on average, thanks to the cut). Memory: the least-squares sums, ``(C+1)²``, and one batch of activations; with
the reconstruction, one layer's inputs and outputs over all samples.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import nn

from separify.backends.onnx.graph import _EXTERNAL_KEY, _chunks, _value_shapes, _with_outputs, graph_inputs, session
from separify.backends.onnx.rewrite import OnnxConvSite, _last_input_name, _output_name, _update
from separify.calibration import LayerFit, PatchStatistics, PointwiseRefit, _accumulate, _Moments, als_fit
from separify.calibration.budget import StepTime, cut_note
from separify.calibration.observation import add_patches
from separify.calibration.reconstruct import reconstruct
from separify.calibration.refit_pass import layer_plan
from separify.config import Calibration


def moments(original: ir.Model, sites: list[OnnxConvSite], kernels: Mapping[str, nn.Conv2d],
            batches: Sequence[torch.Tensor], fixed: int | None, threads: int | None, *, moments: bool = True,
            patches: frozenset[str] = frozenset(), progress=None) -> tuple[dict, dict]:
    """Input moments of every candidate on the calibration data (where ``moments``), captured as extra outputs of
    the original model, and the patch statistics of input and output of the candidates in ``patches``;
    ``progress(done, total)`` after each batch, in samples."""
    names = {s.name: s.node.inputs[0].name for s in sites}
    outs_of = {s.name: s.node.outputs[0].name for s in sites if s.name in patches}
    want = list(dict.fromkeys([*names.values(), *outs_of.values()]))
    sess = session(original, want, threads=threads)
    input_name = graph_inputs(original)[0].name
    samples = sum(len(c) for c in _chunks(batches, fixed))  # as run: a fixed batch size drops a partial batch
    acc = {s.name: _Moments(samples) for s in sites}
    stats: dict = {}
    done = 0
    for chunk in _chunks(batches, fixed):
        outs = dict(zip(want, sess.run(want, {input_name: chunk})))
        for s in sites:
            x = torch.from_numpy(outs[names[s.name]])
            top, left, bottom, right = s.input_pads
            x = F.pad(x, (left, right, top, bottom))  # the pads the kernel conv does not carry (zeros), then its patches
            if moments:
                _accumulate(kernels[s.name], x, acc[s.name])
            if s.name in outs_of:
                add_patches(stats, s.name, kernels[s.name], x, torch.from_numpy(outs[outs_of[s.name]]), samples)
        done += len(chunk)
        if progress is not None:
            progress(done, samples)
    return {n: a.result() for n, a in acc.items() if a.channel is not None}, stats


def calibration_pixels(model: ir.Model, sites: Sequence[OnnxConvSite], batches: Sequence[torch.Tensor],
                        fixed: int | None, threads: int | None) -> dict[str, int]:
    """Per site, the pixels of its output over all calibration samples, at the calibration data's own size (a model
    with dynamic height and width may be calibrated at other sizes than it is converted at, samples of different
    sizes included)."""
    if not sites:
        return {}
    counts: dict[tuple, tuple] = {}  # sample shape → (samples run, one chunk)
    for chunk in _chunks(batches, fixed):
        n, first = counts.get(chunk.shape[1:], (0, chunk))
        counts[chunk.shape[1:]] = (n + len(chunk), first)
    pixels = dict.fromkeys((s.name for s in sites), 0)
    for n, chunk in counts.values():
        shapes = _value_shapes(model, {graph_inputs(model)[0].name: chunk[:1] if fixed is None else chunk},
                               [s.node.outputs[0].name for s in sites], threads)
        for s in sites:
            pixels[s.name] += n * math.prod(shapes[s.node.outputs[0].name][2:])
    return pixels


def _prefix(model: ir.Model, outputs: Sequence[str]) -> ir.Model:
    """The part of ``model`` that computes ``outputs`` from the graph inputs (onnxruntime runs every node of a
    session, whatever outputs are asked for, so the refit runs only the prefix it needs)."""
    if model.functions:
        return _with_outputs(model, outputs)
    graph = ir.convenience.extract(model.graph, inputs=[v.name for v in graph_inputs(model)], outputs=list(outputs))
    sub = ir.Model(graph, ir_version=model.ir_version)
    sub.meta[_EXTERNAL_KEY] = model.meta.get(_EXTERNAL_KEY, False)
    return sub


def refit(original: ir.Model, converted: ir.Model, replaced, batches, fixed, cal: Calibration, threads, *,
          pixels: Mapping[str, int], seed: int = 0, pads=None,
          budget: StepTime | None = None) -> list[LayerFit]:
    """Least-squares refit of every replacement's last 1×1 conv, layer by layer in graph order (module docstring):
    for each layer, onnxruntime runs the original model up to that layer's output and the converted model, with every
    earlier layer already refitted, up to the input of the layer's last 1×1 conv; the sums are streamed. Before the
    refit, as :func:`~separify.calibration.refit_pass.layer_plan` says (``cal.als``, ``cal.steps``): the
    alternating least squares on patch statistics of the depthwise conv's input (padded by the layer's ``pads``),
    streamed in a first pass, then the layer-wise reconstruction on the layer's inputs and outputs (held for that
    layer only), its steps stopped at an equal part of the ``budget`` left for each layer
    (:mod:`~separify.calibration.budget`). ``replaced`` maps layer names to ``(module, initializers, dtype)`` in
    graph order; the initializers are updated in place."""
    input_name = graph_inputs(original)[0].name
    fits = []
    for done, (name, (mod, inits, dtype)) in enumerate(replaced.items()):  # graph order
        # the replacement's output carries the original conv output's name: the same name in both models
        orig_sess = session(_prefix(original, [_output_name(inits)]), threads=threads)
        run_y = lambda chunk, _s=orig_sess, _n=_output_name(inits): _s.run([_n], {input_name: chunk})[0]  # noqa: E731
        layer_als, steps, skip = layer_plan(mod, pixels[name], als=cal.als, steps=cal.steps)
        before = None
        if layer_als > 0:
            before = _als(converted, mod, inits, dtype, run_y, batches, fixed, input_name, pixels[name],
                          list(pads[name]), als=layer_als, ridge=cal.ridge, seed=seed, threads=threads)
        ys = None  # the original layer's outputs per chunk, where the reconstruction read them
        if steps > 0:
            ys, taken = _reconstruct(converted, mod, inits, dtype, run_y, batches, fixed, input_name,
                                     list(pads[name]), cal, steps=steps, seed=seed, threads=threads,
                                     budget=budget, parts=len(replaced) - done)
            skip = "; ".join(filter(None, (skip, cut_note("layer-wise reconstruction", taken, steps)))) or None
        conv_sess = session(_prefix(converted, [_last_input_name(inits)]), threads=threads)  # after the updates
        fit = PointwiseRefit(mod._last(), name, ridge=cal.ridge)
        for i, chunk in enumerate(_chunks(batches, fixed)):
            z = conv_sess.run([_last_input_name(inits)], {input_name: chunk})[0]
            fit.add(torch.from_numpy(z).float(), ys[i] if ys is not None else torch.from_numpy(run_y(chunk)).float())
        res = fit.apply()
        _update(inits, mod, dtype)
        notes = [n for n in (skip, res.note) if n]
        fits.append(dataclasses.replace(res, error_before=res.error_before if before is None else before,
                                        note="; ".join(notes) or None))
    return fits


def _reconstruct(converted, mod, inits, dtype, run_y, batches, fixed, input_name, p, cal: Calibration, *, steps,
                 seed, threads, budget: StepTime | None = None, parts: int = 1) -> tuple[list[torch.Tensor], int]:
    """Layer-wise reconstruction (:func:`~separify.calibration.reconstruct.reconstruct`) of one replacement on the
    input the converted model gives it (every earlier layer refitted) and the original layer's outputs, grouped by
    sample shape; the graph's padding (ONNX ``[top, left, bottom, right]``) is applied to the depthwise conv's input,
    as the graph does; the steps within the next of ``parts`` equal parts of ``budget``'s time (spent by them).
    The graph's initializers are updated. Returns the
    original outputs, one per chunk of ``_chunks(batches, fixed)``, for the refit that follows, and the steps
    taken."""
    x_name = _first_node(inits).inputs[0].name
    sess = session(_prefix(converted, [x_name]), threads=threads)
    xs: dict[tuple, list[torch.Tensor]] = {}
    ys: dict[tuple, list[torch.Tensor]] = {}
    per_chunk = []
    for chunk in _chunks(batches, fixed):
        key = tuple(chunk.shape[1:])
        per_chunk.append(torch.from_numpy(run_y(chunk)).float())
        xs.setdefault(key, []).append(torch.from_numpy(sess.run([x_name], {input_name: chunk})[0]).float())
        ys.setdefault(key, []).append(per_chunk[-1])
    pad = mod.conv_dw.register_forward_pre_hook(lambda _m, a: (F.pad(a[0], (p[1], p[3], p[0], p[2])),))
    try:
        with (budget or StepTime()).part(parts) as until:
            taken = reconstruct(mod, [torch.cat(v) for v in xs.values()], [torch.cat(v) for v in ys.values()],
                                steps=steps, lr=cal.lr, batch_size=cal.batch_size, seed=seed, until=until)
    finally:
        pad.remove()
    _update(inits, mod, dtype)
    return per_chunk, taken


def _first_node(inits):
    """The replacement's first node (its first 1×1 conv for pw-dw-pw, else its depthwise conv)."""
    return inits["pw_in.weight" if "pw_in.weight" in inits else "dw.weight"].uses()[0].node


def _als(converted, mod, inits, dtype, run_y, batches, fixed, input_name, total, p, *, als, ridge, seed,
         threads) -> float:
    """The alternating least squares of the depthwise and last 1×1 conv on patch statistics streamed from
    onnxruntime (``total`` output pixels over all samples); the graph's initializers are updated. Returns the
    error before it (on the sampled pixels)."""
    h_name = inits["dw.weight"].uses()[0].node.inputs[0].name  # the depthwise conv's (unpadded) input
    conv_sess = session(_prefix(converted, [h_name]), threads=threads)
    stats = None
    for chunk in _chunks(batches, fixed):
        y = torch.from_numpy(run_y(chunk)).float()
        h = torch.from_numpy(conv_sess.run([h_name], {input_name: chunk})[0]).float()
        if stats is None:
            stats = PatchStatistics(mod.conv_dw, y.shape[1], total, seed=seed)
        stats.add(F.pad(h, (p[1], p[3], p[0], p[2])), y)  # ONNX [top, left, bottom, right] → F.pad's order
    before = als_fit(mod.conv_dw, mod._last(), stats, iters=als, ridge=ridge)[0]
    _update(inits, mod, dtype)
    return before
