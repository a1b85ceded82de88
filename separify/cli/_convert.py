"""``separify convert``: options (and ``--config FILE``) → :class:`ConvertConfig`, the conversion, fine-tuning, the
report."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, List, Mapping, Optional

import torch
import typer
from rich.markup import escape

from separify.cli import _options as opt
from separify.cli._app import app
from separify.cli._common import (ReportSettings, calibration_data, check_ctc, describe_images, given, guard,
                                  image_options, load_onnx_original, load_original, make_console, preprocessing)
from separify.config import OBJECTIVES, PRECISIONS, ConvertConfig, LatencyTarget
from separify.core.progress import step
from separify.errors import SeparifyError, first_line
from separify.io.data import load_image_folder, load_labeled_file
from separify.io.files import atomic_write, check_output_path, is_onnx
from separify.io.models import save_model
from separify.pipeline import convert as convert_model
from separify.search import check_search
from separify.tuning.finetune import check_temperature


@app.command(cls=opt.Command, help=opt.CONVERT_HELP)
def convert(
    ctx: typer.Context,
    model: Optional[Path] = opt.model_argument(),
    output: Optional[Path] = opt.OUTPUT,
    to: Optional[str] = opt.TO,
    arch: Optional[str] = opt.arch(),
    allow_pickle: bool = opt.allow_pickle(),
    input_shape: Optional[str] = opt.input_shape(),
    class_dim: Optional[int] = opt.class_dim(),
    calib_class_dim: Optional[int] = opt.CLASS_DIM_ALIAS,
    ctc_blank: Optional[int] = opt.ctc_blank(),
    exclude: Optional[List[str]] = opt.EXCLUDE,
    fold_bn: bool = opt.FOLD_BN,
    config: Optional[Path] = opt.CONFIG,
    method: str = opt.METHOD,
    rank: Optional[int] = opt.RANK,
    energy: Optional[float] = opt.ENERGY,
    flops: Optional[float] = opt.FLOPS,
    cp_iters: Optional[int] = opt.CP_ITERS,
    seed: int = opt.seed(),
    calib: Optional[Path] = opt.calib(),
    calib_limit: int = opt.CALIB_LIMIT,
    calib_steps: Optional[int] = opt.CALIB_STEPS,
    calib_output_steps: int = opt.CALIB_OUTPUT_STEPS,
    calib_seconds: Optional[float] = opt.CALIB_SECONDS,
    calib_precision: str = opt.CALIB_PRECISION,
    calib_als: int = opt.CALIB_ALS,
    calib_loss: str = opt.CALIB_LOSS,
    calib_key: Optional[str] = opt.CALIB_KEY,
    calib_native_size: bool = opt.CALIB_NATIVE_SIZE,
    image_size: Optional[str] = opt.image_size(),
    resize: Optional[int] = opt.resize(),
    mean: Optional[str] = opt.mean(),
    std: Optional[str] = opt.std(),
    objective: str = opt.OBJECTIVE,
    target: Optional[str] = opt.TARGET,
    latency_budget: Optional[float] = opt.LATENCY_BUDGET,
    max_drop: Optional[float] = opt.MAX_DROP,
    target_batch: Optional[int] = opt.TARGET_BATCH,
    target_batch_size: Optional[int] = opt.TARGET_BATCH_ALIAS,
    dtype: str = opt.DTYPE,
    channels_last: Optional[bool] = opt.CHANNELS_LAST,
    contiguous: bool = opt.CONTIGUOUS,
    margin: float = opt.MARGIN,
    latency_cache: Optional[Path] = opt.LATENCY_CACHE,
    no_cache: bool = opt.NO_LATENCY_CACHE,
    threads: Optional[int] = opt.threads(),
    finetune: Optional[Path] = opt.FINETUNE_DATA,
    epochs: Optional[int] = opt.EPOCHS,
    steps: Optional[int] = opt.STEPS,
    lr: Optional[float] = opt.LR,
    temperature: Optional[float] = opt.TEMPERATURE,
    finetune_batch_size: int = opt.FINETUNE_BATCH_SIZE,
    checkpoint: Optional[Path] = opt.CHECKPOINT,
    data: Optional[Path] = opt.data(),
    data_limit: int = opt.data_limit(),
    json_out: Optional[Path] = opt.json_out(),
    html_out: Optional[Path] = opt.html_out(),
    png_out: Optional[Path] = opt.png_out(),
    timing: bool = opt.timing(),
    onnx: bool = opt.onnx(),
    layers: bool = opt.layers(),
    min_time: float = opt.min_time(),
    report_batch_size: Optional[int] = opt.REPORT_BATCH_SIZE,
    force: bool = opt.force(),
) -> None:
    """Convert the dense k×k convs of MODEL to depthwise-separable form and print the before/after report (the
    help shown is :data:`separify.cli._options.CONVERT_HELP`)."""
    guard(lambda: run_convert(*_unalias(ctx.params, given(ctx))))


def run_convert(params: Mapping[str, Any], explicit: frozenset[str]) -> None:
    """The body of ``separify convert``: every option is checked before any model is loaded."""
    o = SimpleNamespace(**params)
    image_opts = image_options(o.image_size, o.resize, o.mean, o.std)
    cfg = build_config(params, explicit)
    outputs = dict(class_dim=cfg.calibration.class_dim, ctc_blank=check_ctc(o.ctc_blank, cfg.calibration.class_dim))
    reporting = ReportSettings.from_params(params, batch_size=o.report_batch_size, **outputs)
    tune = FinetuneSettings(data=o.finetune, epochs=o.epochs, steps=o.steps, lr=o.lr, temperature=o.temperature,
                            batch_size=o.finetune_batch_size, checkpoint=o.checkpoint, **outputs)
    for name, flag in (("calib_steps", "--calib-steps"), ("calib_als", "--calib-als"), ("calib_loss", "--calib-loss"),
                       ("calib_output_steps", "--calib-output-steps"), ("calib_precision", "--calib-precision"),
                       ("calib_seconds", "--calib-seconds")):
        if name in explicit and params[name] and o.calib is None:
            raise SeparifyError(f"{flag} needs --calib DATA")
    tune.check()
    calib_opts = dict(key=o.calib_key, native=o.calib_native_size)
    if o.calib is None and (o.calib_key is not None or o.calib_native_size):
        raise SeparifyError(f"{'--calib-key' if o.calib_key is not None else '--calib-native-size'} needs --calib DATA")
    if o.model is None and o.max_drop is None and cfg.objective == "latency" \
            and not explicit & {"flops", "rank", "energy", "latency_budget", "config"}:
        o.max_drop = opt.EMBEDDED_MAX_DROP  # the demo: the fastest plan within a point of its top-1
    if o.max_drop is not None:
        if explicit & {"flops", "rank", "energy", "latency_budget"}:
            raise SeparifyError("--max-drop chooses the plan itself; drop --flops, --rank, --energy and --latency")
        check_search(cfg, o.max_drop, evaluate=lambda m: 0.0)
    out = output_path(o.model, o.output, o.to)
    if o.model is not None and is_onnx(o.model):
        if o.arch or o.allow_pickle:
            raise SeparifyError("--arch and --allow-pickle apply to PyTorch models, not to ONNX files")
        convert_onnx(o.model, out, cfg, o.input_shape, o.calib, tune, image_opts, reporting, max_drop=o.max_drop,
                     calib_opts=calib_opts)
    else:
        convert_torch(o.model, out, cfg, o.input_shape, o.arch, o.allow_pickle, o.calib, tune, image_opts, reporting,
                      max_drop=o.max_drop, calib_opts=calib_opts)


# --- options → ConvertConfig

def _unalias(params: Mapping[str, Any], explicit: frozenset[str]) -> tuple[dict, frozenset[str]]:
    """``--target-batch-size N`` is ``--batch-size N``; ``--calib-class-dim D`` is ``--class-dim D``;
    ``--contiguous`` is ``channels_last=False``."""
    params = dict(params)
    if "contiguous" in explicit and params["contiguous"]:
        if "channels_last" in explicit:
            raise SeparifyError("give --channels-last or --contiguous, not both")
        params["channels_last"], explicit = False, explicit | {"channels_last"}
    for alias, name, flags in (("target_batch_size", "target_batch", "--batch-size or --target-batch-size"),
                               ("calib_class_dim", "class_dim", "--class-dim or --calib-class-dim")):
        if alias in explicit:
            if name in explicit:
                raise SeparifyError(f"give {flags}, not both")
            params[name], explicit = params[alias], explicit | {name}
    return params, explicit


#: convert's parameters that set a ConvertConfig keyword (given on the command line, they override --config)
CONFIG_KEYS = {"method": "method", "rank": "rank", "energy": "energy", "flops": "flops", "cp_iters": "cp_max_iter",
               "seed": "seed", "exclude": "exclude", "fold_bn": "fold_bn", "calib_limit": "calib_limit",
               "calib_steps": "calib_steps", "calib_als": "calib_als", "calib_output_steps": "calib_output_steps",
               "calib_precision": "calib_precision", "calib_seconds": "calib_seconds", "class_dim": "calib_class_dim"}
#: parameters that only apply under the latency objective → their option names
LATENCY_ONLY = {"target_batch": "--batch-size", "dtype": "--dtype",
                "channels_last": "--channels-last/--contiguous",
                "margin": "--margin", "latency_cache": "--latency-cache", "no_cache": "--no-latency-cache"}
#: parameters that set a LatencyTarget field
TARGET_FIELDS = {"target": "backend", "target_batch": "batch_size", "dtype": "dtype", "channels_last": "channels_last",
                 "threads": "threads"}


def build_config(params: Mapping[str, Any], explicit: frozenset[str]) -> ConvertConfig:
    """The ``--config`` file's settings (or the library's defaults), overridden by the options given explicitly."""
    base = ConvertConfig() if params["config"] is None else ConvertConfig.from_toml(params["config"])
    changes = {key: params[name] for name, key in CONFIG_KEYS.items() if name in explicit}
    if "exclude" in changes:
        changes["exclude"] = tuple(changes["exclude"])
    if "calib_loss" in explicit:  # --calib-loss off: the loss-aware weights off
        loss = params["calib_loss"]
        if loss not in ("fisher", "mse", "off"):
            raise SeparifyError(f"--calib-loss must be fisher, mse or off, got {loss!r}")
        changes.update(calib_loss_aware=loss != "off", **({"calib_loss": loss} if loss != "off" else {}))
    if "calib_seconds" in explicit and params["calib_seconds"] == 0:  # --calib-seconds 0: no time budget
        changes["calib_seconds"] = None
    if "calib_precision" in explicit and params["calib_precision"] not in PRECISIONS:
        raise SeparifyError(f"--calib-precision must be {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}, "
                            f"got {params['calib_precision']!r}")
    changes.update(latency_changes(base, params, explicit))
    return base.replace(**changes) if changes else base


def latency_changes(base: ConvertConfig, params: Mapping[str, Any], explicit: frozenset[str]) -> dict:
    """ConvertConfig changes for the latency options given: the objective (``--target`` or ``--latency`` imply
    latency), the target (the file's, with the fields given), margin and cache. Under the FLOPs objective, a
    latency-only option is an error."""
    objective = params["objective"] if "objective" in explicit else base.objective
    if objective not in OBJECTIVES:
        raise SeparifyError(f"--objective must be {' or '.join(OBJECTIVES)}, got {objective!r}")
    if explicit & {"target", "latency_budget"}:
        objective = "latency"
    if objective == "flops":
        named = [flag for name, flag in LATENCY_ONLY.items() if name in explicit]
        if named:
            raise SeparifyError(f"{', '.join(named)} apply to --objective latency (the latency target)"
                                + ("; the fine-tuning batch is --finetune-batch-size" if "target_batch" in explicit
                                   else ""))
        return {"objective": "flops"} if "objective" in explicit else {}
    if {"latency_cache", "no_cache"} <= explicit:
        raise SeparifyError("give --latency-cache or --no-latency-cache, not both")
    target = dataclasses.replace(base.target or LatencyTarget(),
                                 **{field: params[name] for name, field in TARGET_FIELDS.items() if name in explicit})
    changes: dict[str, Any] = dict(objective="latency", target=target)
    if "latency_budget" in explicit:
        changes["latency"] = params["latency_budget"]
    if "margin" in explicit:
        changes["margin"] = params["margin"]
    if "no_cache" in explicit:
        changes["latency_cache"] = False
    elif "latency_cache" in explicit:
        changes["latency_cache"] = str(params["latency_cache"])
    return changes


# --- the output file

_FORMATS = {"onnx": (".onnx",), "pt2": (".pt2",), "pt": (".pt", ".pth")}


def output_path(model_path: Path | None, output: Path | None, to: str | None) -> Path:
    """The output path, checked against ``--to`` and the input's kind (ONNX in → ONNX out)."""
    if to is not None and to not in _FORMATS:
        raise SeparifyError(f"--to must be one of {', '.join(_FORMATS)}, got {to!r}")
    if model_path is None:
        output = output or Path(opt.DEFAULT_OUTPUT).with_suffix(_FORMATS[to or "pt2"][0])
    elif output is None:
        raise SeparifyError("give an output file with -o/--output (.pt2, .pt or .onnx)")
    suffix = output.suffix.lower()
    if to is not None and suffix not in _FORMATS[to]:
        raise SeparifyError(f"--to {to} writes a {' or '.join(_FORMATS[to])} file; the output {output} has another "
                            "suffix")
    if model_path is not None and model_path.exists() and not model_path.is_dir() and is_onnx(model_path) \
            and suffix != ".onnx":
        raise SeparifyError(f"{model_path} is an ONNX model and is converted by the ONNX pass, so it is written as "
                            "ONNX: use -o NAME.onnx")
    return output


def save_converted(model: torch.nn.Module, out: Path, inputs: tuple) -> str:
    """Write the converted PyTorch model; returns how to load it."""
    if out.suffix.lower() == ".onnx":
        from separify.core.measure import export_onnx

        try:
            atomic_write(out, lambda tmp: export_onnx(model, inputs, tmp))
        except RuntimeError as exc:
            raise SeparifyError(f"the converted model could not be exported to ONNX ({first_line(exc)})") from None
    else:
        save_model(model, out, inputs)
    return {".pt2": "torch.export.load(path).module()", ".onnx": "onnxruntime.InferenceSession(path)"}.get(
        out.suffix.lower(), "torch.load(path, weights_only=False)  # needs separify installed")


# --- the two passes

def convert_torch(model_path, output, cfg: ConvertConfig, input_shape, arch, allow_pickle, calib,
                  tune: FinetuneSettings, image_opts, reporting: ReportSettings, *, max_drop=None,
                  calib_opts=None) -> None:
    """``separify convert [model] -o out``: the PyTorch pass, optional fine-tuning, the report."""
    console = make_console()
    sources = () if model_path is None else (model_path,)
    out = check_output_path(output, inputs=sources, force=reporting.force)
    reporting.check(sources + (out,))
    with step("loading the model", console=console):
        original = load_original(console, model_path, arch, allow_pickle, input_shape, cfg.seed)
    model, inputs = original.model, original.inputs
    if model_path is not None and original.kind == "pt2" and out.suffix.lower() not in (".pt2", ".onnx"):
        raise SeparifyError("a model loaded from a .pt2 program can only be written as .pt2 or .onnx (its graph "
                            "module cannot be pickled)")
    with step("reading the data", console=console):
        prep = preprocessing(original, (calib, tune.data, reporting.data), image_opts)
        calibration = calibration_data(console, calib, prep, cfg.calibration.limit, **(calib_opts or {}))
        tune_data = finetune_data(console, model, tune, prep) if tune.data is not None else None
        eval_data = reporting.eval_data(console, original, prep)
    search, eval_data = search_options(max_drop, model, eval_data, reporting)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same messages are in result.warnings, printed by the report
        result = convert_model(model, cfg, example_inputs=inputs, progress=True, calibration=calibration, **search)
    if not result.layers:
        raise SeparifyError("the model has no Conv2d layers; nothing to convert")
    if tune_data is not None:
        from separify.tuning.finetune import finetune

        run_finetune(console, tune, cfg.seed, *tune_data, run=lambda b, **kw: finetune(result.model, model, b, **kw))
        result.model.eval()
    with step(f"writing {out}", console=console):
        how = save_converted(result.model, out, inputs)
    rep = reporting.run(model, result, inputs, eval_data, files=(model_path, out))
    reporting.show(console, rep, title=f"separify: {model_path or 'embedded model'} → {out}")
    console.print(f"wrote {out}  (load with: {how})")


def convert_onnx(model_path: Path, output: Path, cfg: ConvertConfig, input_shape, calib, tune: FinetuneSettings,
                 image_opts, reporting: ReportSettings, *, max_drop=None, calib_opts=None) -> None:
    """``separify convert model.onnx -o out.onnx``: the ONNX pass, optional fine-tuning (onnx2torch), the report."""
    from separify.backends import onnx as onnx_pass
    from separify.pipeline import convert_onnx as convert_onnx_model

    console = make_console()
    out = check_output_path(output, inputs=(model_path,), force=reporting.force, suffixes=(".onnx",))
    reporting.check((model_path, out))
    if reporting.batch_size is not None:
        raise SeparifyError("--report-batch-size applies to PyTorch models; for ONNX give the whole shape with "
                            "--input-shape")
    with step("loading the model", console=console):
        source, shape, stand_in = load_onnx_original(console, model_path, input_shape, cfg.seed)
    with step("reading the data", console=console):
        prep = preprocessing(stand_in, (calib, tune.data, reporting.data), image_opts)
        calibration = calibration_data(console, calib, prep, cfg.calibration.limit, **(calib_opts or {}))
        tune_data = finetune_data(console, None, tune, prep) if tune.data is not None else None
        eval_data = reporting.eval_data(console, stand_in, prep)
    search, eval_data = search_options(max_drop, onnx_pass.OrtModule(onnx_pass.load_onnx(source),
                                                                    threads=reporting.threads),
                                       eval_data, reporting) if max_drop is not None else ({}, eval_data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = convert_onnx_model(source, cfg, input_shapes=shape, calibration=calibration,
                                    threads=reporting.threads, progress=True, **search)
    if not result.layers:
        raise SeparifyError("the model has no Conv nodes; nothing to convert")
    if result.output_error is not None:
        console.print(f"checked: onnx.checker (full) and strict shape inference pass; relative output error vs the "
                      f"original in onnxruntime on random inputs: {result.output_error:.3g}")
    if tune_data is not None:
        run_finetune(console, tune, cfg.seed, *tune_data,
                     run=lambda b, **kw: onnx_pass.finetune_onnx(source, result, b, **kw))
        console.print("fine-tuned factors written back into the converted ONNX graph")
    with step(f"writing {out}", console=console):
        written = result.save(out)
    rep = reporting.run_onnx(model_path, out, shape, eval_data, cfg.seed, result=result)
    reporting.show(console, rep, title=f"separify: {model_path} → {out}")
    console.print(f"wrote {', '.join(str(p) for p in written)}  (run with: onnxruntime.InferenceSession(path))")


# --- the max-drop search

def search_options(max_drop: float | None, original, eval_data: tuple,
                   outputs: ReportSettings) -> tuple[dict, tuple]:
    """``convert``'s ``max_drop``/``evaluate``/``metric_name`` for ``--max-drop``, and the report's evaluation data.

    The evaluation data is split in two halves: the plan is selected on the first (top-1 accuracy with labels, or
    the sequence accuracy with ``outputs.ctc_blank``; else top-1 agreement with the original, which ``original``
    runs, over ``outputs.class_dim``) and the report measures the second, so the reported accuracy is not the one
    the plan was selected on."""
    if max_drop is None:
        return {}, eval_data
    x, y, what = eval_data
    if x is None:
        raise SeparifyError("--max-drop needs evaluation data to measure the metric on: give --data (held-out "
                            "samples, with labels for top-1 accuracy)")
    if len(x) < 2:
        raise SeparifyError(f"--max-drop needs at least 2 evaluation samples (half select, half report); got {len(x)}")
    from separify.core.measure import accuracy, agreement
    from separify.tuning.ctc import sequence_accuracy

    half = len(x) // 2
    xs, ys = x[:half], (y[:half] if y is not None else None)
    report = (x[half:], y[half:] if y is not None else None, f"{what}, samples {half + 1}-{len(x)}")
    picked = f"{what}, samples 1-{half}"
    if ys is not None and outputs.ctc_blank is not None:
        return dict(max_drop=max_drop, evaluate=lambda m: sequence_accuracy(m, xs, ys, blank=outputs.ctc_blank),
                    metric_name=f"sequence accuracy ({picked})"), report
    if ys is not None:
        return dict(max_drop=max_drop, evaluate=lambda m: accuracy(m, xs, ys),
                    metric_name=f"top-1 accuracy ({picked})"), report

    def agree(m) -> float:
        top1, rel = agreement(original, m, xs, class_dim=outputs.class_dim)
        return top1 if top1 is not None else 1.0 - rel

    return dict(max_drop=max_drop, evaluate=agree, metric_name=f"agreement with the original ({picked})"), report


# --- fine-tuning

@dataclass(frozen=True, kw_only=True)
class FinetuneSettings:
    """The fine-tuning options of ``separify convert``."""

    data: Path | None
    epochs: int | None
    steps: int | None
    lr: float | None
    temperature: float | None
    batch_size: int
    checkpoint: Path | None
    class_dim: int | None = None
    ctc_blank: int | None = None

    def outputs(self) -> dict:
        """``finetune``'s keywords for the model's outputs: the class axis; with ``ctc_blank``, the CTC loss on the
        labels, and the original's greedy decodings as the labels of batches that have none."""
        if self.ctc_blank is None:
            return dict(class_dim=self.class_dim)
        from separify.tuning.ctc import ctc_greedy_targets, ctc_loss

        return dict(class_dim=-1, label_loss=functools.partial(ctc_loss, blank=self.ctc_blank),
                    pseudo_labels=functools.partial(ctc_greedy_targets, blank=self.ctc_blank))

    def check(self) -> None:
        """Refuse bad fine-tuning options before the conversion, not after it."""
        if self.temperature is not None:
            check_temperature(self.temperature, "--temperature")
        if self.lr is not None and not self.lr > 0:
            raise SeparifyError(f"--lr must be a positive number, got {self.lr}")
        if self.data is None and any(v is not None for v in (self.epochs, self.steps, self.checkpoint)):
            raise SeparifyError("--epochs, --steps and --checkpoint need --finetune DATA")
        if self.data is not None and self.batch_size <= 0:
            raise SeparifyError(f"--finetune-batch-size must be a positive integer, got {self.batch_size}")


def finetune_data(console, teacher, tune: FinetuneSettings, prep):
    """Fine-tuning inputs and labels, loaded before the conversion so that bad data fails fast."""
    if prep is None or not tune.data.is_dir():
        return load_labeled_file(tune.data, sequences=tune.ctc_blank is not None)
    x, y, classes = load_image_folder(tune.data, **asdict(prep))
    if classes is not None and tune.ctc_blank is not None:
        raise SeparifyError(f"{tune.data} has class folders, but with --ctc-blank the labels are CTC targets: give "
                            "them as the 'labels' (N, S) of a tensor file, or a folder of images without labels")
    if classes is not None and teacher is not None:
        with torch.no_grad():
            logits = teacher(x[:1])
        if isinstance(logits, torch.Tensor) and logits.dim() == 2 and len(classes) > logits.shape[1]:
            raise SeparifyError(f"{tune.data} has {len(classes)} class folders but the model has {logits.shape[1]} "
                                "outputs; labels are the class indices in sorted folder-name order, so there can be "
                                "at most one class per output")
    console.print(f"Fine-tuning data: {tune.data} ({describe_images(x, classes)}"
                  + (f", labels = sorted folder names {_few(classes)}" if classes is not None else "")
                  + f"; {prep.describe()})", markup=False, highlight=False, soft_wrap=True)
    return x, y


def _settings(res) -> str:
    """``lr 0.0003 (range test), temperature 2 (from the original's outputs), hard 0.5 (...)``: what fine-tuning
    used."""
    how = {"lr": " (range test)", "temperature": " (from the original's outputs)",
           "hard": " (from the original's outputs)"}
    return ", ".join(f"{k} {getattr(res, k):g}{how[k] if k in res.chosen else ''}"
                     for k in ("lr", "temperature", "hard"))


def _few(names) -> str:
    return ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")


def kept_note(res) -> str | None:
    """Why fine-tuning ``res`` (a :class:`~separify.FinetuneResult`) ended with the model it started from, by the
    score its check used (``None`` where it kept a later state)."""
    if not (res.kept_step == 0 and res.steps > 0 and len(res.scores) > 1):
        return None
    first, last = res.scores[0][1], res.scores[-1][1]
    where = f"the {res.held_out} batches held out of fine-tuning" if res.held_out else "the first fine-tuning batches"
    if res.check == "label loss":
        return f"its loss on the labels of {where} was {-first:.4g}, the fine-tuned one's {-last:.4g}"
    if res.check == "agreement":
        return f"it agreed with the original on {first:.1%} of the samples of {where}, the fine-tuned one on {last:.1%}"
    return f"it scored {first:.4g}, the fine-tuned one {last:.4g}"


def run_finetune(console, tune: FinetuneSettings, seed: int, x, y, *, run) -> None:
    """Batch the fine-tuning data and call ``run(batches, **finetune options)`` (separify.finetune or finetune_onnx)."""
    epochs = tune.epochs if tune.epochs is not None or tune.steps is not None else opt.FINETUNE_EPOCHS
    b = tune.batch_size
    batches = [(x[i : i + b],) + ((y[i : i + b],) if y is not None else ()) for i in range(0, len(x), b)]
    labelled = "with labels" if y is not None else "without labels"
    if tune.ctc_blank is not None:
        labelled = "with CTC targets" if y is not None else "labelled by the original's greedy CTC decodings"
    console.print(f"Fine-tuning on {tune.data}: {len(x)} samples, {labelled}")
    res = run(batches, epochs=epochs, steps=tune.steps, lr=tune.lr, seed=seed, checkpoint=tune.checkpoint,
              temperature=tune.temperature, progress=True, **tune.outputs())
    if res.losses:
        console.print(f"fine-tuned {res.steps} steps" + (f" (resumed at step {res.resumed_from})"
                      if res.resumed_from is not None else "") + f", {_settings(res)}: loss {res.losses[0]:.4f} → "
                      f"{res.losses[-1]:.4f}" + (f"; {res.held_out} batches held out for the check"
                                                 if res.held_out else ""))
    note = kept_note(res)
    if note:
        console.print(f"[yellow]kept the model as it was before fine-tuning:[/yellow] {note}")
    if res.stopped:
        console.print(f"[yellow]warning:[/yellow] {escape(res.stopped)}")
