"""``separify`` command line: parses options and calls the library; nothing else lives here.

Every error a user can cause is printed as one ``error:`` line on stderr with exit code 1 (2 for usage errors
reported by the parser). The input file is only ever read.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

import torch
import typer
from rich.console import Console

from separify import __version__
from separify.pipeline import convert as convert_model
from separify.config import METHODS, ConvertConfig
from separify.errors import SeparifyError, first_line
from separify.tuning.finetune import check_temperature
from separify.io.models import (ImagePreprocessing, atomic_write, check_output_path, is_onnx, load_image_folder,
                       load_labeled_file, load_model, load_tensor_file, parse_shape, save_model)

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Make trained CNNs cheaper: replace dense "
                  "convolutions with depthwise-separable approximations.")
err = Console(stderr=True, soft_wrap=True)

DEFAULT_OUTPUT = "fashion_resnet_separable.pt2"


# Options shared by convert, report and compare.
_IMAGE_SIZE = typer.Option(None, "--image-size", help="Image folders: centre-crop size H,W (or one number for a square; "
                           "default: the H,W of the example input).")
_RESIZE = typer.Option(None, "--resize", help="Image folders: resize the shorter side to this before the centre crop; "
                       "0: no resize (default: max(H,W)·256/224 when max(H,W) >= 64, else max(H,W)).")
_MEAN = typer.Option(None, "--mean", help="Image folders: per-channel mean for normalising pixels in [0, 1], e.g. "
                     "0.485,0.456,0.406 (default: ImageNet's for 3 channels; the training statistics for the embedded "
                     "model; 0.5 otherwise).")
_STD = typer.Option(None, "--std", help="Image folders: per-channel standard deviation, e.g. 0.229,0.224,0.225 "
                    "(defaults as for --mean).")
_DATA = typer.Option(None, "--data", help="Evaluation data for the report: a tensor file (.npy/.npz/.pt; top-1/top-5 "
                     "accuracy when it has 'labels') or a folder of images (labels from class subfolders). Without it: "
                     "agreement with the original on random inputs (the embedded model: its held-out test images).")
_DATA_LIMIT = typer.Option(1000, "--data-limit", help="Evaluate on at most this many samples of --data.")
_JSON = typer.Option(None, "--json", help="Also write the report as JSON (versioned schema, every figure with its unit).")
_HTML = typer.Option(None, "--html", help="Also write the report as one self-contained HTML page with plots.")
_PNG = typer.Option(None, "--png", help="Also write the report's plots as one PNG.")
_THREADS = typer.Option(None, "--threads", help="CPU threads for timing (PyTorch and ONNX Runtime; default: all).")
_TIMING = typer.Option(True, "--timing/--no-timing", help="Time the whole models.")
_ONNX = typer.Option(True, "--onnx/--no-onnx", help="Also export both models to ONNX and time them in ONNX Runtime.")
_MIN_TIME = typer.Option(0.5, "--min-time", help="Seconds of timed runs per model (after warm-up); per layer a tenth.")
_ARCH = typer.Option(None, "--arch", help="Architecture for a state dict, as package.module:callable, optionally with "
                     "literal keyword arguments (e.g. torchvision.models:resnet18 or "
                     "'torchvision.models:resnet18(num_classes=10)').")
_PICKLE = typer.Option(False, "--allow-pickle", help="Allow loading a pickled module; this runs code from the file, "
                       "so only for files you trust.")
_INPUT_SHAPE = typer.Option(None, "--input-shape", help="Example input shape, e.g. 1,3,224,224 (default: stored with "
                            "a .pt2, else 1,3,224,224).")
_FORCE = typer.Option(False, "--force", help="Replace output files that exist.")
_LAYERS = typer.Option(True, "--layers/--no-layers", help="Time every original conv and its replacement.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"separify {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """separify: depthwise-separable conversion of trained convolutional networks."""


def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(1)


@app.command()
def convert(
    model: Optional[Path] = typer.Argument(
        None, help="Model file: a torch.export .pt2, a state dict (with --arch), a pickled module (with "
        "--allow-pickle) or an ONNX model (.onnx, converted by the ONNX pass). Omit it to convert the embedded "
        "Fashion-MNIST model."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Where to write the converted model: .pt2 "
                                          "(torch.export), .pt/.pth (pickled module) or .onnx. Default for the "
                                          f"embedded model: {DEFAULT_OUTPUT}."),
    to: Optional[str] = typer.Option(None, "--to", help="Output format: onnx, pt2 or pt (default: from the -o "
                                     "suffix). ONNX models are always written as ONNX."),
    method: str = typer.Option("pw-dw-pw", "--method", "-m", help=f"Replacement form: {' | '.join(METHODS)}."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Fixed rank for every layer (dw-pw: depthwise "
                                       "multiplier K; pw-dw-pw: intermediate channels R)."),
    energy: Optional[float] = typer.Option(None, "--energy", help="Per layer, keep this fraction of the kernel "
                                           "energy, in (0, 1]."),
    flops: Optional[float] = typer.Option(None, "--flops", help="Keep this fraction of the model's FLOPs, in "
                                          "(0, 1]; ranks are allocated across layers. Default 0.5 when no rank "
                                          "option is given."),
    objective: str = typer.Option("flops", "--objective", help="flops: choose ranks by FLOPs and error. latency: "
                                  "time every candidate on --target, keep a layer dense unless a replacement is "
                                  "faster, use each rank's fastest equivalent layout, and time both models."),
    target: Optional[str] = typer.Option(None, "--target", help="Latency target (implies --objective latency): "
                                         "cpu (PyTorch eager), cuda (PyTorch eager on the GPU) or onnxruntime "
                                         "(ONNX Runtime CPU). Default cpu."),
    latency_budget: Optional[float] = typer.Option(None, "--latency", "--latency-budget", help="Keep this fraction "
                                                   "of the whole model's time measured on --target, in (0, 1] "
                                                   "(implies --objective latency; instead of --flops)."),
    target_batch: Optional[int] = typer.Option(None, "--batch-size", "--target-batch-size", help="Batch size the "
                                               "latency target times at (default: the example input's). The "
                                               "fine-tuning batch is --finetune-batch-size."),
    dtype: str = typer.Option("float32", "--dtype", help="Latency target dtype: float32, bfloat16 or float16 "
                              "(cuda)."),
    channels_last: bool = typer.Option(False, "--channels-last", help="Time the latency target in channels-last "
                                       "memory format."),
    margin: float = typer.Option(0.05, "--margin", help="A replacement must be measured at least this fraction "
                                 "faster than the dense conv to be used."),
    latency_cache: Optional[Path] = typer.Option(None, "--latency-cache", help="File of cached layer timings "
                                                 "(default: ~/.cache/separify/latency.json, or "
                                                 "$SEPARIFY_CACHE_DIR/latency.json)."),
    no_cache: bool = typer.Option(False, "--no-latency-cache", help="Time every candidate afresh; keep no cache."),
    input_shape: Optional[str] = _INPUT_SHAPE,
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="Leave layers whose name matches this "
                                                "pattern dense (fnmatch, e.g. 'layer4.*'); repeatable."),
    arch: Optional[str] = _ARCH,
    allow_pickle: bool = _PICKLE,
    force: bool = _FORCE,
    fold_bn: bool = typer.Option(True, "--fold-bn/--no-fold-bn", help="Fold BatchNorm into the conv before it."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration inputs: a tensor file (.npy/.npz/.pt, "
                                         "shape (N, ...), preprocessed as the model expects) or a folder of images "
                                         "(see --image-size): refit each replacement to the original layer's outputs "
                                         "on them."),
    calib_limit: int = typer.Option(1000, "--calib-limit", help="Use at most this many calibration samples."),
    calib_steps: int = typer.Option(0, "--calib-steps", help="With --calib: after the least-squares refit, this many "
                                    "Adam steps on all factors of each replacement against the original layer's "
                                    "outputs (layer-wise reconstruction; slower, much better at very low ranks)."),
    calib_als: Optional[int] = typer.Option(None, "--calib-als", help="With --calib: iterations of alternating least "
                                            "squares fitting each replacement's depthwise and last 1×1 conv to the "
                                            "original layer's outputs (default: the library's; 0 skips it)."),
    finetune_data: Optional[Path] = typer.Option(None, "--finetune", help="Fine-tune the converted model by "
                                                 "distillation from the original on these inputs: a tensor file "
                                                 "(.npy/.npz/.pt; labels used when the .npz/.pt has a 'labels' entry) "
                                                 "or a folder of images (labels used when it has one subfolder per "
                                                 "class, numbered in sorted name order)."),
    image_size: Optional[str] = _IMAGE_SIZE,
    resize: Optional[int] = _RESIZE,
    mean: Optional[str] = _MEAN,
    std: Optional[str] = _STD,
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Fine-tuning epochs (default 1 with --finetune)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Fine-tuning steps, instead of --epochs."),
    lr: float = typer.Option(1e-4, "--lr", help="Fine-tuning learning rate (AdamW, cosine schedule)."),
    temperature: float = typer.Option(4.0, "--temperature", help="Fine-tuning distillation temperature (on the OCR "
                                      "benchmark, a CTC model over 8,210 classes, 1 did much better than 4)."),
    batch_size: int = typer.Option(64, "--finetune-batch-size", help="Fine-tuning batch size."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Fine-tuning checkpoint file: saved "
                                              "periodically, resumed from if it exists."),
    cp_iters: Optional[int] = typer.Option(None, "--cp-iters", help="CP-ALS sweeps for pw-dw-pw (default 25, or 5 "
                                           "for layers that --calib's alternating least squares refits afterwards)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the example input and the CP solver."),
    data: Optional[Path] = _DATA,
    data_limit: int = _DATA_LIMIT,
    json_out: Optional[Path] = _JSON,
    html_out: Optional[Path] = _HTML,
    png_out: Optional[Path] = _PNG,
    threads: Optional[int] = _THREADS,
    timing: bool = _TIMING,
    onnx: bool = _ONNX,
    layers: bool = _LAYERS,
    min_time: float = _MIN_TIME,
    report_batch_size: Optional[int] = typer.Option(None, "--report-batch-size", help="Batch size for the report's "
                                                    "timings and FLOPs (default: the example input's)."),
) -> None:
    """Convert the dense k×k convs of MODEL to depthwise-separable form and print the before/after report."""
    def work():
        image_opts = _image_opts(image_size, resize, mean, std)
        reporting = _Reporting(data, data_limit, json_out, html_out, png_out, threads, timing, onnx, layers, min_time,
                               force, report_batch_size)
        tune = dict(data=finetune_data, epochs=epochs, steps=steps, lr=lr, batch_size=batch_size,
                    checkpoint=checkpoint, temperature=temperature)
        lat = _latency_options(objective, target, latency_budget, target_batch, dtype, channels_last, threads,
                               margin, latency_cache, no_cache)
        cfg = ConvertConfig(method=method, rank=rank, energy=energy, flops=flops, exclude=tuple(exclude or ()),
                            fold_bn=fold_bn, cp_max_iter=cp_iters, seed=seed, calib_limit=calib_limit,
                            calib_steps=calib_steps, **lat, **({} if calib_als is None else dict(calib_als=calib_als)))
        if calib_steps and calib is None:
            raise SeparifyError("--calib-steps needs --calib DATA")
        if calib_als and calib is None:
            raise SeparifyError("--calib-als needs --calib DATA")
        check_temperature(temperature, "--temperature")  # before the conversion, not after it
        out = _output(model, output, to)
        if model is not None and is_onnx(model):
            if arch or allow_pickle:
                raise SeparifyError("--arch and --allow-pickle apply to PyTorch models, not to ONNX files")
            _convert_onnx(model, out, cfg, input_shape, seed, calib, tune, image_opts, reporting, force)
        else:
            _convert(model, out, cfg, input_shape, arch, allow_pickle, force, calib, tune, image_opts, reporting)

    _guard(work)


def _latency_options(objective, target, budget, batch, dtype, channels_last, threads, margin, cache_path,
                     no_cache) -> dict:
    """ConvertConfig fields for the latency objective (empty for the FLOPs objective, after checking that no
    latency-only option was given)."""
    if objective not in ("flops", "latency"):
        raise SeparifyError(f"--objective must be flops or latency, got {objective!r}")
    if objective == "flops" and target is None and budget is None:
        given = [name for name, on in (("--batch-size", batch is not None), ("--dtype", dtype != "float32"),
                                       ("--channels-last", channels_last), ("--margin", margin != 0.05),
                                       ("--latency-cache", cache_path is not None),
                                       ("--no-latency-cache", no_cache)) if on]
        if given:
            raise SeparifyError(f"{', '.join(given)} apply to --objective latency (the latency target)"
                                + ("; the fine-tuning batch is --finetune-batch-size" if batch is not None else ""))
        return {}
    if cache_path is not None and no_cache:
        raise SeparifyError("give --latency-cache or --no-latency-cache, not both")
    from separify.planning.latency import LatencyTarget

    return dict(objective="latency", latency=budget, margin=margin,
                latency_cache=False if no_cache else (str(cache_path) if cache_path is not None else True),
                target=LatencyTarget(target or "cpu", batch_size=batch, dtype=dtype, channels_last=channels_last,
                                     threads=threads))


def _guard(work) -> None:
    """Run a command body: library errors become one ``error:`` line and exit status 1, never a traceback."""
    try:
        work()
    except SeparifyError as exc:
        _fail(str(exc))
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception as exc:  # never a bare traceback; SEPARIFY_DEBUG=1 shows it
        if os.environ.get("SEPARIFY_DEBUG"):
            raise
        _fail(f"unexpected {type(exc).__name__}: {exc} (set SEPARIFY_DEBUG=1 for the traceback)")


def _image_opts(image_size, resize, mean, std) -> dict:
    return dict(size=_numbers(image_size, "--image-size", int, (1, 2)), resize=resize,
                mean=_numbers(mean, "--mean", float), std=_numbers(std, "--std", float))


def _numbers(text, option, cast, counts=None):
    """``"1,2"`` → ``(1, 2)`` (``None`` stays ``None``); one value given for two doubles it (``--image-size 28``)."""
    if text is None:
        return None
    try:
        values = tuple(cast(p) for p in text.split(","))
    except ValueError:
        values = ()
    if not values or (counts and len(values) not in counts):
        what = "H,W or one number" if counts else "numbers separated by commas"
        raise SeparifyError(f"{option} must be {what}, got {text!r}")
    return values * 2 if counts and len(values) == 1 else values


@dataclass
class _Original:
    model: torch.nn.Module
    inputs: tuple
    eval_data: tuple | None  # (images, labels, description) shipped with the embedded model
    embedded: bool
    kind: str


def _load_original(console, model_path, arch, allow_pickle, input_shape, seed) -> _Original:
    """The model to convert (a file, or the embedded default) and its example input, checked to run."""
    if model_path is None:
        if arch or allow_pickle:
            raise SeparifyError("--arch and --allow-pickle need a MODEL file")
        from separify.io.embedded import load_default_model, load_eval_data

        images, labels = load_eval_data()
        console.print(f"Embedded model: FashionResNet trained on Fashion-MNIST; accuracy on {len(images)} held-out "
                      "test images")
        return _Original(load_default_model(), (images[:1],),
                         (images, labels, f"{len(images)} held-out Fashion-MNIST test images"), True, "embedded")
    loaded = load_model(model_path, arch=arch, allow_pickle=allow_pickle)
    model = loaded.model
    if input_shape:
        inputs = (torch.randn(parse_shape(input_shape), generator=torch.Generator().manual_seed(seed)),)
    elif loaded.example_inputs is not None:
        inputs = loaded.example_inputs
    else:
        inputs = (torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(seed)),)
    shapes = ", ".join(str(tuple(t.shape)) for t in inputs if isinstance(t, torch.Tensor))
    console.print(f"Loaded {model_path} ({loaded.kind}); example input {shapes}")
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as exc:
        raise SeparifyError(f"the model does not run on the example input {shapes} ({type(exc).__name__}: "
                            f"{first_line(exc)}); give --input-shape") from None
    return _Original(model, inputs, None, False, loaded.kind)


def _preprocessing(original: _Original, folders, image_opts) -> ImagePreprocessing | None:
    """How to turn image folders into inputs (``None`` when no folder is given; options without a folder: error)."""
    if any(p is not None and p.is_dir() for p in folders):
        if original.embedded:
            from separify.io.embedded import MEAN, STD

            image_opts = dict(image_opts, mean=image_opts["mean"] or (MEAN,), std=image_opts["std"] or (STD,))
        first = original.inputs[0] if original.inputs and isinstance(original.inputs[0], torch.Tensor) else torch.empty(0)
        return ImagePreprocessing.for_input(tuple(first.shape), **image_opts)
    if any(v is not None for v in image_opts.values()):
        raise SeparifyError("--image-size, --resize, --mean and --std apply to image folders; give a folder to "
                            "--calib, --finetune or --data")
    return None


@dataclass
class _Reporting:
    """The report options of a command, and what to do with the report."""

    data: Path | None
    data_limit: int
    json: Path | None
    html: Path | None
    png: Path | None
    threads: int | None
    latency: bool
    onnx: bool
    layers: bool
    min_time: float
    force: bool
    batch_size: int | None = None

    def check(self, inputs: tuple) -> None:
        """Refuse bad options and output paths before any work is done."""
        if self.threads is not None and self.threads <= 0:
            raise SeparifyError(f"--threads must be a positive integer, got {self.threads}")
        if self.min_time <= 0:
            raise SeparifyError(f"--min-time must be positive, got {self.min_time}")
        if self.batch_size is not None and self.batch_size <= 0:
            raise SeparifyError(f"batch size must be a positive integer, got {self.batch_size}")
        if self.data_limit <= 0:
            raise SeparifyError(f"--data-limit must be a positive integer, got {self.data_limit}")
        for path, suffix in ((self.json, ".json"), (self.html, ".html"), (self.png, ".png")):
            if path is not None:
                check_output_path(path, inputs=inputs, force=self.force, suffixes=(suffix,))

    def eval_data(self, console, original: _Original, prep) -> tuple:
        """``(data, labels, description)`` for the quality rows."""
        if self.data is None:
            return original.eval_data or (None, None, None)
        if self.data.is_dir():
            x, y, classes = load_image_folder(self.data, **asdict(prep), limit=self.data_limit)
            what = f"{self.data}: {_images(x, classes)}"
        else:
            x, y = load_labeled_file(self.data)
            x, y = x[: self.data_limit], (y[: self.data_limit] if y is not None else None)
            what = f"{self.data}: {len(x)} samples" + (" with labels" if y is not None else "")
        console.print(f"Evaluation data: {what}", markup=False, highlight=False)
        return x, y, what

    def run(self, console, original, converted, inputs, data, files=(None, None), device="cpu", fallback=False):
        from separify.reporting import report

        x, y, what = data
        return report(original, converted, example_inputs=inputs, data=x, labels=y, data_name=what, device=device,
                      fallback_to_cpu=fallback, batch_size=self.batch_size, threads=self.threads, latency=self.latency,
                      onnx=self.onnx, per_layer=self.layers, min_run_time=self.min_time,
                      layer_min_run_time=self.min_time / 10, files=files, progress=True)

    def run_onnx(self, original, converted, shape, data, seed, result=None):
        from separify.reporting import report_onnx

        x, y, what = data
        return report_onnx(original, converted, result=result, input_shapes=shape, data=x, labels=y, data_name=what,
                           threads=self.threads, latency=self.latency, min_run_time=self.min_time, progress=True,
                           seed=seed)

    def emit(self, console, doc, title: str) -> None:
        """Write the JSON/HTML/PNG files asked for."""
        from separify.reporting.html import write_html, write_png
        from separify.reporting import write_json

        if self.json is not None:
            write_json(doc.to_dict(), self.json)
            console.print(f"wrote {self.json}")
        if self.html is not None:
            write_html(doc, self.html, title=title)
            console.print(f"wrote {self.html}")
        if self.png is not None:
            write_png(doc, self.png)
            console.print(f"wrote {self.png}")


def _calibration_data(console, calib: Path | None, prep, limit: int):
    """The calibration inputs from a folder of images or a tensor file (``None`` without ``--calib``)."""
    if calib is None:
        return None
    if prep is not None and calib.is_dir():
        x, _, classes = load_image_folder(calib, **asdict(prep), limit=limit)
        console.print(f"Calibration data: {calib} ({_images(x, classes)}; {prep.describe()})", markup=False,
                      highlight=False, soft_wrap=True)
        return x
    x = load_tensor_file(calib)
    console.print(f"Calibration data: {calib} ({min(len(x), limit)} samples of shape {tuple(x.shape[1:])})")
    return x


def _console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 160)


_FORMATS = {"onnx": (".onnx",), "pt2": (".pt2",), "pt": (".pt", ".pth")}


def _output(model_path: Path | None, output: Path | None, to: str | None) -> Path:
    """The output path, checked against ``--to`` and the input's kind (ONNX in → ONNX out)."""
    if to is not None and to not in _FORMATS:
        raise SeparifyError(f"--to must be one of {', '.join(_FORMATS)}, got {to!r}")
    if model_path is None:
        output = output or Path(DEFAULT_OUTPUT if to in (None, "pt2") else f"fashion_resnet_separable.{to}")
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


def _convert(model_path, output, cfg, input_shape, arch, allow_pickle, force, calib, tune, image_opts,
             reporting: _Reporting) -> None:
    console = _console()
    seed, calib_limit = cfg.seed, cfg.calib_limit
    sources = () if model_path is None else (model_path,)
    out = check_output_path(output, inputs=sources, force=force)
    reporting.check(sources + (out,))
    original = _load_original(console, model_path, arch, allow_pickle, input_shape, seed)
    model, inputs = original.model, original.inputs
    if model_path is not None and original.kind == "pt2" and out.suffix.lower() not in (".pt2", ".onnx"):
        raise SeparifyError("a model loaded from a .pt2 program can only be written as .pt2 or .onnx (its graph "
                            "module cannot be pickled)")

    prep = _preprocessing(original, (calib, tune["data"], reporting.data), image_opts)
    calibration = _calibration_data(console, calib, prep, calib_limit)
    tune_data = _finetune_data(console, model, tune, prep) if tune["data"] is not None else None
    eval_data = reporting.eval_data(console, original, prep)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same messages are in result.warnings, printed by the report
        result = convert_model(model, cfg, example_inputs=inputs, progress=True, calibration=calibration)
    if not result.layers:
        raise SeparifyError("the model has no Conv2d layers; nothing to convert")
    if tune_data is not None:
        from separify.tuning.finetune import finetune

        _finetune(console, tune, seed, *tune_data, run=lambda b, **kw: finetune(result.model, model, b, **kw))
        result.model.eval()
    elif tune["epochs"] is not None or tune["steps"] is not None or tune["checkpoint"] is not None:
        raise SeparifyError("--epochs, --steps and --checkpoint need --finetune DATA")

    if out.suffix.lower() == ".onnx":
        from separify.core.measure import export_onnx

        try:
            atomic_write(out, lambda tmp: export_onnx(result.model, inputs, tmp))
        except RuntimeError as exc:
            raise SeparifyError(f"the converted model could not be exported to ONNX ({first_line(exc)})") from None
    else:
        save_model(result.model, out, inputs)
    rep = reporting.run(console, model, result, inputs, eval_data, files=(model_path, out))
    from separify.reporting import print_report

    print_report(rep, console)
    reporting.emit(console, rep, title=f"separify: {model_path or 'embedded model'} → {out}")
    how = {".pt2": "torch.export.load(path).module()", ".onnx": "onnxruntime.InferenceSession(path)"}.get(
        out.suffix.lower(), "torch.load(path, weights_only=False)  # needs separify installed")
    console.print(f"wrote {out}  (load with: {how})")


def _convert_onnx(model_path: Path, output: Path, cfg: ConvertConfig, input_shape, seed, calib, tune, image_opts,
                  reporting: _Reporting, force: bool) -> None:
    """``separify convert model.onnx -o out.onnx``: the ONNX pass, optional fine-tuning (onnx2torch), the report."""
    from separify.backends.onnx import onnx_pass
    from separify.reporting import print_report

    console = _console()
    out = check_output_path(output, inputs=(model_path,), force=force, suffixes=(".onnx",))
    reporting.check((model_path, out))
    if reporting.batch_size is not None:
        raise SeparifyError("--report-batch-size applies to PyTorch models; for ONNX give the whole shape with "
                            "--input-shape")
    source, shape, stand_in = _load_onnx_original(console, model_path, input_shape, seed)
    prep = _preprocessing(stand_in, (calib, tune["data"], reporting.data), image_opts)
    calibration = _calibration_data(console, calib, prep, cfg.calib_limit)
    tune_data = _finetune_data(console, None, tune, prep) if tune["data"] is not None else None
    if tune_data is None and any(tune[k] is not None for k in ("epochs", "steps", "checkpoint")):
        raise SeparifyError("--epochs, --steps and --checkpoint need --finetune DATA")
    eval_data = reporting.eval_data(console, stand_in, prep)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = onnx_pass.convert_onnx(source, cfg, input_shapes=shape, calibration=calibration,
                                        threads=reporting.threads, progress=True)
    if not result.layers:
        raise SeparifyError("the model has no Conv nodes; nothing to convert")
    if result.output_error is not None:
        console.print(f"checked: onnx.checker (full) and strict shape inference pass; relative output error vs the "
                      f"original in onnxruntime on random inputs: {result.output_error:.3g}")
    if tune_data is not None:
        _finetune(console, tune, seed, *tune_data,
                  run=lambda b, **kw: onnx_pass.finetune_onnx(source, result, b, **kw))
        console.print("fine-tuned factors written back into the converted ONNX graph")
    written = result.save(out)
    rep = reporting.run_onnx(model_path, out, shape, eval_data, seed, result=result)
    print_report(rep, console)
    reporting.emit(console, rep, title=f"separify: {model_path} → {out}")
    console.print(f"wrote {', '.join(str(p) for p in written)}  (run with: onnxruntime.InferenceSession(path))")


@app.command()
def report(
    original_path: Path = typer.Argument(..., metavar="ORIGINAL", help="The model before conversion (.pt2, state "
                                         "dict with --arch, or pickled module with --allow-pickle)."),
    converted_path: Path = typer.Argument(..., metavar="CONVERTED", help="The converted model (.pt2 as written by "
                                          "separify convert, or a pickled module with --allow-pickle)."),
    arch: Optional[str] = _ARCH,
    allow_pickle: bool = _PICKLE,
    input_shape: Optional[str] = _INPUT_SHAPE,
    data: Optional[Path] = _DATA,
    data_limit: int = _DATA_LIMIT,
    image_size: Optional[str] = _IMAGE_SIZE,
    resize: Optional[int] = _RESIZE,
    mean: Optional[str] = _MEAN,
    std: Optional[str] = _STD,
    device: str = typer.Option("cpu", "--device", help="Where PyTorch timings run: cpu or cuda (ONNX Runtime always "
                               "runs on the CPU)."),
    fallback_cpu: bool = typer.Option(False, "--fallback-cpu", help="With --device cuda and no GPU: measure on the "
                                      "CPU instead of stopping."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size for timing and FLOPs (the example "
                                             "input's first sample repeated; default: the example input's batch)."),
    threads: Optional[int] = _THREADS,
    json_out: Optional[Path] = _JSON,
    html_out: Optional[Path] = _HTML,
    png_out: Optional[Path] = _PNG,
    timing: bool = _TIMING,
    onnx: bool = _ONNX,
    layers: bool = _LAYERS,
    min_time: float = _MIN_TIME,
    force: bool = _FORCE,
    seed: int = typer.Option(0, "--seed", help="Seed for random inputs."),
) -> None:
    """Measure ORIGINAL and CONVERTED side by side: FLOPs, parameters, size, latency, accuracy, per layer."""
    def work():
        console = _console()
        image_opts = _image_opts(image_size, resize, mean, std)
        reporting = _Reporting(data, data_limit, json_out, html_out, png_out, threads, timing, onnx, layers,
                               min_time, force, batch_size)
        reporting.check((original_path, converted_path))
        onnx_files = [is_onnx(p) for p in (original_path, converted_path)]
        if any(onnx_files):
            if not all(onnx_files):
                raise SeparifyError("give two ONNX files or two PyTorch models (export the PyTorch one with "
                                    "separify convert ... --to onnx)")
            _report_onnx(console, original_path, converted_path, input_shape, seed, image_opts, reporting)
            return
        original = _load_original(console, original_path, arch, allow_pickle, input_shape, seed)
        loaded = load_model(converted_path, allow_pickle=allow_pickle)
        console.print(f"Loaded {converted_path} ({loaded.kind})")
        prep = _preprocessing(original, (data,), image_opts)
        eval_data = reporting.eval_data(console, original, prep)
        rep = reporting.run(console, original.model, loaded.model, original.inputs, eval_data,
                            files=(original_path, converted_path), device=device, fallback=fallback_cpu)
        from separify.reporting import print_report

        print_report(rep, console)
        reporting.emit(console, rep, title=f"separify report: {original_path} → {converted_path}")

    _guard(work)


def _load_onnx_original(console, model_path: Path, input_shape, seed):
    """The ONNX model, the input shape asked for (or ``None``), and a stand-in :class:`_Original` holding its example
    input (for the data options, which need the input's shape)."""
    from separify.backends.onnx.onnx_pass import example_feeds, load_onnx

    source = load_onnx(model_path)
    shape = parse_shape(input_shape) if input_shape else None
    feeds = example_feeds(source, shape, seed=seed)
    console.print(f"Loaded {model_path} (ONNX, opset {source.opset_imports.get('', '?')}); example input "
                  + ", ".join(f"{k} {tuple(v.shape)}" for k, v in feeds.items()))
    return source, shape, _Original(None, tuple(torch.from_numpy(v) for v in feeds.values()), None, False, "onnx")


def _report_onnx(console, original_path, converted_path, input_shape, seed, image_opts, reporting) -> None:
    from separify.reporting import print_report

    if reporting.batch_size is not None:
        raise SeparifyError("--batch-size applies to PyTorch models; for ONNX give the whole shape with --input-shape")
    _, shape, stand_in = _load_onnx_original(console, original_path, input_shape, seed)
    prep = _preprocessing(stand_in, (reporting.data,), image_opts)
    rep = reporting.run_onnx(original_path, converted_path, shape, reporting.eval_data(console, stand_in, prep), seed)
    print_report(rep, console)
    reporting.emit(console, rep, title=f"separify report: {original_path} → {converted_path}")


@app.command()
def compare(
    model: Optional[Path] = typer.Argument(None, help="Model file (as for convert); omit it for the embedded model."),
    flops: str = typer.Option("0.75,0.5,0.25", "--flops", help="FLOPs targets to compare, comma-separated."),
    methods: Optional[List[str]] = typer.Option(None, "--method", "-m", help=f"Forms to compare ({' | '.join(METHODS)}); "
                                                "repeatable (default: both)."),
    arch: Optional[str] = _ARCH,
    allow_pickle: bool = _PICKLE,
    input_shape: Optional[str] = _INPUT_SHAPE,
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration data for every conversion (as for "
                                         "convert)."),
    calib_limit: int = typer.Option(1000, "--calib-limit", help="Use at most this many calibration samples."),
    data: Optional[Path] = _DATA,
    data_limit: int = _DATA_LIMIT,
    image_size: Optional[str] = _IMAGE_SIZE,
    resize: Optional[int] = _RESIZE,
    mean: Optional[str] = _MEAN,
    std: Optional[str] = _STD,
    threads: Optional[int] = _THREADS,
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size for timing and FLOPs (default: "
                                             "the example input's)."),
    json_out: Optional[Path] = _JSON,
    html_out: Optional[Path] = _HTML,
    png_out: Optional[Path] = _PNG,
    onnx: bool = _ONNX,
    min_time: float = _MIN_TIME,
    force: bool = _FORCE,
    seed: int = typer.Option(0, "--seed", help="Seed for the example input and the CP solver."),
) -> None:
    """Convert one model at several settings and compare them: FLOPs, latency and accuracy trade-off (--html plots
    the curves)."""
    def work():
        from separify.reporting import compare as compare_runs, print_comparison

        console = _console()
        targets = _numbers(flops, "--flops", float)
        forms = list(dict.fromkeys(methods or METHODS))
        for f in forms:
            if f not in METHODS:
                raise SeparifyError(f"--method must be one of {', '.join(METHODS)}, got {f!r}")
        reporting = _Reporting(data, data_limit, json_out, html_out, png_out, threads, True, onnx, False, min_time,
                               force, batch_size)
        reporting.check(() if model is None else (model,))
        original = _load_original(console, model, arch, allow_pickle, input_shape, seed)
        prep = _preprocessing(original, (calib, data), _image_opts(image_size, resize, mean, std))
        calibration = _calibration_data(console, calib, prep, calib_limit)
        x, y, what = reporting.eval_data(console, original, prep)
        settings = [dict(method=f, flops=t, seed=seed, calib_limit=calib_limit) for f in forms for t in targets]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            comp = compare_runs(
                original.model, settings, example_inputs=original.inputs, calibration=calibration, data=x, labels=y,
                data_name=what, threads=threads, batch_size=batch_size, onnx=onnx, min_run_time=min_time, progress=True,
                on_result=lambda label, _r: console.print(f"converted: {label}"))
        print_comparison(comp, console)
        reporting.emit(console, comp, title=f"separify compare: {model or 'embedded model'}")

    _guard(work)


def _images(x, classes) -> str:
    return f"{len(x)} images" + (f" in {len(classes)} classes" if classes is not None else "")


def _finetune_data(console, teacher, tune, prep):
    """Fine-tuning inputs and labels, loaded before the conversion so that bad data fails fast."""
    data = tune["data"]
    if prep is None or not data.is_dir():
        return load_labeled_file(data)
    x, y, classes = load_image_folder(data, **asdict(prep))
    if classes is not None and teacher is not None:
        with torch.no_grad():
            logits = teacher(x[:1])
        if isinstance(logits, torch.Tensor) and logits.dim() == 2 and len(classes) > logits.shape[1]:
            raise SeparifyError(f"{data} has {len(classes)} class folders but the model has {logits.shape[1]} "
                                "outputs; labels are the class indices in sorted folder-name order, so there can be "
                                "at most one class per output")
    console.print(f"Fine-tuning data: {data} ({_images(x, classes)}"
                  + (f", labels = sorted folder names {_few(classes)}" if classes is not None else "")
                  + f"; {prep.describe()})", markup=False, highlight=False, soft_wrap=True)
    return x, y


def _few(names) -> str:
    return ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")


def _finetune(console, tune, seed, x, y, *, run) -> None:
    """Batch the fine-tuning data and call ``run(batches, **finetune options)`` (separify.finetune or finetune_onnx)."""
    if tune["batch_size"] <= 0:
        raise SeparifyError(f"--finetune-batch-size must be a positive integer, got {tune['batch_size']}")
    epochs = tune["epochs"] if tune["epochs"] is not None or tune["steps"] is not None else 1
    batches = [(x[i : i + tune["batch_size"]],) + ((y[i : i + tune["batch_size"]],) if y is not None else ())
               for i in range(0, len(x), tune["batch_size"])]
    console.print(f"Fine-tuning on {tune['data']}: {len(x)} samples, {'with' if y is not None else 'without'} labels")
    res = run(batches, epochs=epochs, steps=tune["steps"], lr=tune["lr"], seed=seed, checkpoint=tune["checkpoint"],
              temperature=tune["temperature"], progress=True)
    if res.losses:
        console.print(f"fine-tuned {res.steps} steps" + (f" (resumed at step {res.resumed_from})"
                      if res.resumed_from is not None else "") + f": loss {res.losses[0]:.4f} → {res.losses[-1]:.4f}")
    if res.stopped:
        console.print(f"[yellow]warning:[/yellow] {res.stopped}")


def run() -> None:  # console-script entry point
    app(prog_name="separify")


if __name__ == "__main__":
    run()
