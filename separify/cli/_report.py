"""``separify report`` (two models side by side) and ``separify compare`` (one model at several settings)."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, List, Mapping, Optional

import typer

from separify.cli import _options as opt
from separify.cli._app import app
from separify.cli._common import (ReportSettings, calibration_data, check_ctc, guard, image_options,
                                  load_onnx_original, load_original, make_console, numbers, preprocessing)
from separify.config import METHODS
from separify.errors import SeparifyError
from separify.io.files import is_onnx
from separify.io.models import load_model

_M, _R = opt.MEASURED, opt.REPORT


@app.command(cls=opt.Command)
def report(
    ctx: typer.Context,
    original_path: Path = typer.Argument(..., metavar="ORIGINAL", help="The model before "
                                         "conversion (.pt2, state dict with --arch, or pickled module with "
                                         "--allow-pickle)."),
    converted_path: Path = typer.Argument(..., metavar="CONVERTED", help="The converted model "
                                          "(.pt2 as written by separify convert, or a pickled module with "
                                          "--allow-pickle)."),
    arch: Optional[str] = opt.arch(_M),
    allow_pickle: bool = opt.allow_pickle(_M),
    input_shape: Optional[str] = opt.input_shape(_M),
    class_dim: Optional[int] = opt.class_dim(_M, help="The class axis of the models' output logits, for the "
                                             f"agreement ({opt.CLASS_AXIS_DEFAULT})."),
    ctc_blank: Optional[int] = opt.ctc_blank(_M, help="The models output CTC logits (B, T, C) with this blank "
                                             "class: the report scores the sequence accuracy on --data's labels "
                                             "(targets (N, S) padded with the blank)."),
    seed: int = opt.seed(_M, help="Seed for random inputs."),
    device: str = typer.Option("cpu", "--device", rich_help_panel=opt.LATENCY, help="Where PyTorch timings run: cpu "
                               "or cuda (ONNX Runtime always runs on the CPU)."),
    fallback_cpu: bool = typer.Option(False, "--fallback-cpu", rich_help_panel=opt.LATENCY, help="With --device cuda "
                                      "and no GPU: measure on the CPU instead of stopping."),
    batch_size: Optional[int] = opt.batch_size(help="Batch size for timing and FLOPs (the example input's first "
                                               "sample repeated; default: the example input's batch)."),
    threads: Optional[int] = opt.threads(),
    data: Optional[Path] = opt.data(),
    data_limit: int = opt.data_limit(),
    image_size: Optional[str] = opt.image_size(_R),
    resize: Optional[int] = opt.resize(_R),
    mean: Optional[str] = opt.mean(_R),
    std: Optional[str] = opt.std(_R),
    json_out: Optional[Path] = opt.json_out(),
    html_out: Optional[Path] = opt.html_out(),
    png_out: Optional[Path] = opt.png_out(),
    timing: bool = opt.timing(),
    onnx: bool = opt.onnx(),
    layers: bool = opt.layers(),
    min_time: float = opt.min_time(),
    force: bool = opt.force(),
) -> None:
    """Measure ORIGINAL and CONVERTED side by side: FLOPs, parameters, size, latency, accuracy, per layer."""
    guard(lambda: run_report(ctx.params))


def run_report(params: Mapping[str, Any]) -> None:
    o = SimpleNamespace(**params)
    console = make_console()
    image_opts = image_options(o.image_size, o.resize, o.mean, o.std)
    reporting = ReportSettings.from_params(params, ctc_blank=check_ctc(o.ctc_blank, o.class_dim))
    reporting.check((o.original_path, o.converted_path))
    title = f"separify report: {o.original_path} → {o.converted_path}"
    onnx_files = [is_onnx(p) for p in (o.original_path, o.converted_path)]
    if any(onnx_files):
        if not all(onnx_files):
            raise SeparifyError("give two ONNX files or two PyTorch models (export the PyTorch one with "
                                "separify convert ... --to onnx)")
        if reporting.batch_size is not None:
            raise SeparifyError("--batch-size applies to PyTorch models; for ONNX give the whole shape with "
                                "--input-shape")
        _, shape, stand_in = load_onnx_original(console, o.original_path, o.input_shape, o.seed)
        prep = preprocessing(stand_in, (reporting.data,), image_opts)
        rep = reporting.run_onnx(o.original_path, o.converted_path, shape,
                                 reporting.eval_data(console, stand_in, prep), o.seed)
        reporting.show(console, rep, title=title)
        return
    original = load_original(console, o.original_path, o.arch, o.allow_pickle, o.input_shape, o.seed)
    loaded = load_model(o.converted_path, allow_pickle=o.allow_pickle)
    console.print(f"Loaded {o.converted_path} ({loaded.kind})")
    prep = preprocessing(original, (reporting.data,), image_opts)
    eval_data = reporting.eval_data(console, original, prep)
    rep = reporting.run(original.model, loaded.model, original.inputs, eval_data,
                        files=(o.original_path, o.converted_path), device=o.device, fallback=o.fallback_cpu)
    reporting.show(console, rep, title=title)


@app.command(cls=opt.Command)
def compare(
    ctx: typer.Context,
    model: Optional[Path] = opt.model_argument(help="Model file (as for convert); omit it for the embedded model."),
    arch: Optional[str] = opt.arch(),
    allow_pickle: bool = opt.allow_pickle(),
    input_shape: Optional[str] = opt.input_shape(),
    flops: str = typer.Option(opt.COMPARE_FLOPS, "--flops", rich_help_panel=opt.RANKS,
                              help="FLOPs targets to compare, comma-separated."),
    methods: Optional[List[str]] = typer.Option(None, "--method", "-m", rich_help_panel=opt.RANKS, help="Forms to "
                                                f"compare ({' | '.join(METHODS)}); repeatable (default: dw-pw and pw-dw-pw)."),
    seed: int = opt.seed(),
    calib: Optional[Path] = opt.calib(help="Calibration data for every conversion (as for convert)."),
    calib_limit: int = opt.CALIB_LIMIT,
    image_size: Optional[str] = opt.image_size(),
    resize: Optional[int] = opt.resize(),
    mean: Optional[str] = opt.mean(),
    std: Optional[str] = opt.std(),
    threads: Optional[int] = opt.threads(),
    batch_size: Optional[int] = opt.batch_size(),
    data: Optional[Path] = opt.data(),
    data_limit: int = opt.data_limit(),
    json_out: Optional[Path] = opt.json_out(),
    html_out: Optional[Path] = opt.html_out(),
    png_out: Optional[Path] = opt.png_out(),
    onnx: bool = opt.onnx(),
    min_time: float = opt.min_time(),
    force: bool = opt.force(),
) -> None:
    """Convert one model at several settings and compare their FLOPs, latency and accuracy.

    --html plots the trade-off curves."""
    guard(lambda: run_compare(ctx.params))


def run_compare(params: Mapping[str, Any]) -> None:
    from separify.reporting import compare as compare_runs, print_comparison

    o = SimpleNamespace(**params)
    console = make_console()
    targets = numbers(o.flops, "--flops", float)
    forms = list(dict.fromkeys(o.methods or METHODS[:2]))
    for f in forms:
        if f not in METHODS:
            raise SeparifyError(f"--method must be one of {', '.join(METHODS)}, got {f!r}")
    reporting = ReportSettings.from_params(params, timing=True, layers=False)
    reporting.check(() if o.model is None else (o.model,))
    original = load_original(console, o.model, o.arch, o.allow_pickle, o.input_shape, o.seed)
    prep = preprocessing(original, (o.calib, o.data), image_options(o.image_size, o.resize, o.mean, o.std))
    calibration = calibration_data(console, o.calib, prep, o.calib_limit)
    x, y, what = reporting.eval_data(console, original, prep)
    settings = [dict(method=f, flops=t, seed=o.seed, calib_limit=o.calib_limit) for f in forms for t in targets]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        comp = compare_runs(
            original.model, settings, example_inputs=original.inputs, calibration=calibration, data=x, labels=y,
            data_name=what, threads=o.threads, batch_size=o.batch_size, onnx=o.onnx, min_run_time=o.min_time,
            progress=True, on_result=lambda label, _r: console.print(f"converted: {label}"))
    reporting.show(console, comp, title=f"separify compare: {o.model or 'embedded model'}", printer=print_comparison)
