"""What the commands share: error handling, loading the original model, data options, the report settings."""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import typer
from rich.console import Console
from rich.markup import escape

from separify.errors import SeparifyError, first_line
from separify.io.data import ImagePreprocessing, load_calibration_file, load_image_folder, load_labeled_file
from separify.io.files import check_output_path
from separify.io.models import load_model, parse_shape

err = Console(stderr=True, soft_wrap=True)


def fail(message: str) -> None:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False)  # a message may hold "[ranks]"
    raise typer.Exit(1)


def guard(work: Callable[[], None]) -> None:
    """Run a command body: library errors become one ``error:`` line and exit status 1, never a traceback."""
    try:
        work()
    except SeparifyError as exc:
        fail(str(exc))
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception as exc:  # never a bare traceback; SEPARIFY_DEBUG=1 shows it
        if os.environ.get("SEPARIFY_DEBUG"):
            raise
        fail(f"unexpected {type(exc).__name__}: {exc} (set SEPARIFY_DEBUG=1 for the traceback)")


def given(ctx: typer.Context) -> frozenset[str]:
    """The names of the command's parameters that were given on the command line (not left at their default).

    Compared by name: ``ParameterSource`` lives in typer's private copy of click (``typer._click.core``)."""
    return frozenset(name for name in ctx.params
                     if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE")


def make_console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 160)


def image_options(image_size, resize, mean, std) -> dict:
    return dict(size=numbers(image_size, "--image-size", int, (1, 2)), resize=resize,
                mean=numbers(mean, "--mean", float), std=numbers(std, "--std", float))


def numbers(text, option, cast, counts=None):
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


def describe_images(x, classes) -> str:
    return f"{len(x)} images" + (f" in {len(classes)} classes" if classes is not None else "")


@dataclass
class Original:
    model: torch.nn.Module | None
    inputs: tuple
    eval_data: tuple | None  # (images, labels, description) shipped with the embedded model
    embedded: bool
    kind: str


def load_original(console, model_path, arch, allow_pickle, input_shape, seed) -> Original:
    """The model to convert (a file, or the embedded default) and its example input, checked to run."""
    if model_path is None:
        if arch or allow_pickle:
            raise SeparifyError("--arch and --allow-pickle need a MODEL file")
        from separify.io.embedded import load_default_model, load_eval_data

        images, labels = load_eval_data()
        console.print(f"Embedded model: FashionResNet trained on Fashion-MNIST; accuracy on {len(images)} held-out "
                      "test images")
        return Original(load_default_model(), (images[:1],),
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
    return Original(model, inputs, None, False, loaded.kind)


def load_onnx_original(console, model_path: Path, input_shape, seed):
    """The ONNX model, the input shape asked for (or ``None``), and a stand-in :class:`Original` holding its example
    input (for the data options, which need the input's shape)."""
    from separify.backends.onnx import example_feeds, load_onnx

    source = load_onnx(model_path)
    shape = parse_shape(input_shape) if input_shape else None
    feeds = example_feeds(source, shape, seed=seed)
    console.print(f"Loaded {model_path} (ONNX, opset {source.opset_imports.get('', '?')}); example input "
                  + ", ".join(f"{k} {tuple(v.shape)}" for k, v in feeds.items()))
    return source, shape, Original(None, tuple(torch.from_numpy(v) for v in feeds.values()), None, False, "onnx")


def preprocessing(original: Original, folders, image_opts) -> ImagePreprocessing | None:
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


def calibration_data(console, calib: Path | None, prep, limit: int, *, key: str | None = None,
                     native: bool = False):
    """The calibration inputs from a folder of images (``native``: each at its own size) or a tensor file (the
    array ``key``); ``None`` without ``--calib``."""
    if calib is None:
        return None
    if prep is not None and calib.is_dir():
        if key is not None:
            raise SeparifyError("--calib-key names an array of a tensor file; --calib is an image folder")
        prep = replace(prep, size=None, resize=None) if native else prep
        x, _, classes = load_image_folder(calib, **asdict(prep), limit=limit)
        console.print(f"Calibration data: {calib} ({describe_images(x, classes)}; {prep.describe()})", markup=False,
                      highlight=False, soft_wrap=True)
        return x
    if native:
        raise SeparifyError("--calib-native-size applies to an image folder; a tensor file's samples keep their shape")
    x = load_calibration_file(calib, key=key)
    if isinstance(x, list):
        sizes = sorted({tuple(t.shape) for t in x[:limit]})
        console.print(f"Calibration data: {calib} ({min(len(x), limit)} arrays of {len(sizes)} shape(s), e.g. "
                      f"{sizes[0]})")
    else:
        console.print(f"Calibration data: {calib} ({min(len(x), limit)} samples of shape {tuple(x.shape[1:])})")
    return x


def check_ctc(blank: int | None, class_dim: int | None) -> int | None:
    """``--ctc-blank``: a class index; CTC logits are ``(B, T, C)``, so ``--class-dim``, if given, is -1."""
    if blank is not None and blank < 0:
        raise SeparifyError(f"--ctc-blank must be a class index (0 or more), got {blank}")
    if blank is not None and class_dim not in (None, -1):
        raise SeparifyError(f"--ctc-blank reads (B, T, C) logits, whose classes are the last axis; --class-dim "
                            f"{class_dim} names another (give -1 or leave it out)")
    return blank


@dataclass(frozen=True, kw_only=True)
class ReportSettings:
    """The report options of a command (named as the commands' parameters), and what to do with the report."""

    data: Path | None
    data_limit: int
    json_out: Path | None
    html_out: Path | None
    png_out: Path | None
    threads: int | None
    timing: bool
    onnx: bool
    layers: bool
    min_time: float
    force: bool
    batch_size: int | None
    class_dim: int | None = None
    ctc_blank: int | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, Any], **settings: Any) -> "ReportSettings":
        """From a command's parameters, by name; ``settings`` give (or replace) the ones it names otherwise."""
        return cls(**{f.name: params[f.name] for f in fields(cls) if f.name in params} | settings)

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
        for path, suffix in ((self.json_out, ".json"), (self.html_out, ".html"), (self.png_out, ".png")):
            if path is not None:
                check_output_path(path, inputs=inputs, force=self.force, suffixes=(suffix,))

    def eval_data(self, console, original: Original, prep) -> tuple:
        """``(data, labels, description)`` for the quality rows."""
        if self.data is None:
            return original.eval_data or (None, None, None)
        if self.data.is_dir():
            x, y, classes = load_image_folder(self.data, **asdict(prep), limit=self.data_limit)
            what = f"{self.data}: {describe_images(x, classes)}"
            if classes is not None and self.ctc_blank is not None:
                raise SeparifyError(f"{self.data} has class folders, but with --ctc-blank the labels are CTC "
                                    "targets: give them as the 'labels' (N, S) of a tensor file")
        else:
            x, y = load_labeled_file(self.data, sequences=self.ctc_blank is not None)
            x, y = x[: self.data_limit], (y[: self.data_limit] if y is not None else None)
            what = f"{self.data}: {len(x)} samples" + (" with labels" if y is not None else "")
        console.print(f"Evaluation data: {what}", markup=False, highlight=False)
        return x, y, what

    def run(self, original, converted, inputs, data, files=(None, None), device="cpu", fallback=False):
        from separify.reporting import report

        x, y, what = data
        return report(original, converted, example_inputs=inputs, data=x, labels=y, data_name=what,
                      class_dim=self.class_dim, ctc_blank=self.ctc_blank, device=device,
                      fallback_to_cpu=fallback, batch_size=self.batch_size, threads=self.threads, latency=self.timing,
                      onnx=self.onnx, per_layer=self.layers, min_run_time=self.min_time,
                      layer_min_run_time=self.min_time / 10, files=files, progress=True)

    def run_onnx(self, original, converted, shape, data, seed, result=None):
        from separify.reporting import report_onnx

        x, y, what = data
        return report_onnx(original, converted, result=result, input_shapes=shape, data=x, labels=y, data_name=what,
                           class_dim=self.class_dim, ctc_blank=self.ctc_blank,
                           threads=self.threads, latency=self.timing, min_run_time=self.min_time, progress=True,
                           seed=seed)

    def show(self, console, doc, title: str, printer: Callable | None = None) -> None:
        """Print the report (or comparison, with its ``printer``) and write the JSON/HTML/PNG files asked for."""
        from separify.reporting import print_report, write_json
        from separify.reporting.html import write_html, write_png

        (printer or print_report)(doc, console)
        for path, write in ((self.json_out, lambda p: write_json(doc.to_dict(), p)),
                            (self.html_out, lambda p: write_html(doc, p, title=title)),
                            (self.png_out, lambda p: write_png(doc, p))):
            if path is not None:
                write(path)
                console.print(f"wrote {path}")
