"""``separify`` command line: parses options and calls the library; nothing else lives here.

Every error a user can cause is printed as one ``error:`` line on stderr with exit code 1 (2 for usage errors
reported by the parser). The input file is only ever read.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import torch
import typer
from rich.console import Console

from . import __version__
from .api import convert as convert_model
from .config import METHODS, ConvertConfig
from .errors import SeparifyError, first_line
from .measure import accuracy, output_error
from .model_io import (ImagePreprocessing, check_output_path, load_image_folder, load_labeled_file, load_model,
                       load_tensor_file, parse_shape, save_model)
from .report import Evaluation, print_report

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Make trained CNNs cheaper: replace dense "
                  "convolutions with depthwise-separable approximations.")
err = Console(stderr=True, soft_wrap=True)

DEFAULT_OUTPUT = "fashion_resnet_separable.pt2"


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
        None, help="Model file: a torch.export .pt2, a state dict (with --arch) or a pickled module (with "
        "--allow-pickle). Omit it to convert the embedded Fashion-MNIST model."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Where to write the converted model: .pt2 "
                                          f"(torch.export) or .pt/.pth (pickled module). Default for the embedded "
                                          f"model: {DEFAULT_OUTPUT}."),
    method: str = typer.Option("pw-dw-pw", "--method", "-m", help=f"Replacement form: {' | '.join(METHODS)}."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Fixed rank for every layer (dw-pw: depthwise "
                                       "multiplier K; pw-dw-pw: intermediate channels R)."),
    energy: Optional[float] = typer.Option(None, "--energy", help="Per layer, keep this fraction of the kernel "
                                           "energy, in (0, 1]."),
    flops: Optional[float] = typer.Option(None, "--flops", help="Keep this fraction of the model's FLOPs, in "
                                          "(0, 1]; ranks are allocated across layers. Default 0.5 when no rank "
                                          "option is given."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Example input shape, e.g. 1,3,224,224 "
                                              "(default: stored with a .pt2, else 1,3,224,224)."),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="Leave layers whose name matches this "
                                                "pattern dense (fnmatch, e.g. 'layer4.*'); repeatable."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture for a state dict, as "
                                       "package.module:callable (e.g. torchvision.models:resnet18)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow loading a pickled module; this runs "
                                      "code from the file, so only for files you trust."),
    force: bool = typer.Option(False, "--force", help="Replace the output file if it exists."),
    fold_bn: bool = typer.Option(True, "--fold-bn/--no-fold-bn", help="Fold BatchNorm into the conv before it."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration inputs: a tensor file (.npy/.npz/.pt, "
                                         "shape (N, ...), preprocessed as the model expects) or a folder of images "
                                         "(see --image-size): refit each replacement to the original layer's outputs "
                                         "on them."),
    calib_limit: int = typer.Option(1000, "--calib-limit", help="Use at most this many calibration samples."),
    finetune_data: Optional[Path] = typer.Option(None, "--finetune", help="Fine-tune the converted model by "
                                                 "distillation from the original on these inputs: a tensor file "
                                                 "(.npy/.npz/.pt; labels used when the .npz/.pt has a 'labels' entry) "
                                                 "or a folder of images (labels used when it has one subfolder per "
                                                 "class, numbered in sorted name order)."),
    image_size: Optional[str] = typer.Option(None, "--image-size", help="Image folders: centre-crop size H,W (or one "
                                             "number for a square; default: the H,W of the example input)."),
    resize: Optional[int] = typer.Option(None, "--resize", help="Image folders: resize the shorter side to this "
                                         "before the centre crop; 0: no resize (default: max(H,W)·256/224 when "
                                         "max(H,W) >= 64, else max(H,W))."),
    mean: Optional[str] = typer.Option(None, "--mean", help="Image folders: per-channel mean for normalising pixels "
                                       "in [0, 1], e.g. 0.485,0.456,0.406 (default: ImageNet's for 3 channels; the "
                                       "training statistics for the embedded model; 0.5 otherwise)."),
    std: Optional[str] = typer.Option(None, "--std", help="Image folders: per-channel standard deviation, e.g. "
                                      "0.229,0.224,0.225 (defaults as for --mean)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Fine-tuning epochs (default 1 with --finetune)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Fine-tuning steps, instead of --epochs."),
    lr: float = typer.Option(1e-4, "--lr", help="Fine-tuning learning rate (AdamW, cosine schedule)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Fine-tuning batch size."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Fine-tuning checkpoint file: saved "
                                              "periodically, resumed from if it exists."),
    cp_iters: int = typer.Option(25, "--cp-iters", help="ALS sweeps for pw-dw-pw."),
    seed: int = typer.Option(0, "--seed", help="Seed for the example input and the CP solver."),
) -> None:
    """Convert the dense k×k convs of MODEL to depthwise-separable form and print the before/after report."""
    try:
        image_opts = dict(size=_numbers(image_size, "--image-size", int, (1, 2)), resize=resize,
                          mean=_numbers(mean, "--mean", float), std=_numbers(std, "--std", float))
        _convert(model, output, method, rank, energy, flops, input_shape, exclude or [], arch, allow_pickle, force,
                 fold_bn, cp_iters, seed, calib, calib_limit,
                 dict(data=finetune_data, epochs=epochs, steps=steps, lr=lr, batch_size=batch_size,
                      checkpoint=checkpoint), image_opts)
    except SeparifyError as exc:
        _fail(str(exc))
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception as exc:  # never a bare traceback; SEPARIFY_DEBUG=1 shows it
        if os.environ.get("SEPARIFY_DEBUG"):
            raise
        _fail(f"unexpected {type(exc).__name__}: {exc} (set SEPARIFY_DEBUG=1 for the traceback)")


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


def _convert(model_path, output, method, rank, energy, flops, input_shape, exclude, arch, allow_pickle, force,
             fold_bn, cp_iters, seed, calib, calib_limit, tune, image_opts) -> None:
    console = Console(width=None if sys.stdout.isatty() else 160)
    cfg = ConvertConfig(method=method, rank=rank, energy=energy, flops=flops, exclude=tuple(exclude),
                        fold_bn=fold_bn, cp_max_iter=cp_iters, seed=seed, calib_limit=calib_limit)
    embedded = model_path is None
    if embedded:
        if arch or allow_pickle:
            raise SeparifyError("--arch and --allow-pickle need a MODEL file")
        output = output or Path(DEFAULT_OUTPUT)
    elif output is None:
        raise SeparifyError("give an output file with -o/--output (.pt2 or .pt)")
    out = check_output_path(output, inputs=() if embedded else (model_path,), force=force)

    evaluations: list[Evaluation] = []
    if embedded:
        from .embedded import load_default_model, load_eval_data

        model = load_default_model()
        images, labels = load_eval_data()
        inputs = (images[:1],)
        console.print(f"Embedded model: FashionResNet trained on Fashion-MNIST; accuracy on {len(images)} held-out "
                      "test images")
    else:
        loaded = load_model(model_path, arch=arch, allow_pickle=allow_pickle)
        model = loaded.model
        if loaded.kind == "pt2" and out.suffix.lower() != ".pt2":
            raise SeparifyError("a model loaded from a .pt2 program can only be written as .pt2 (its graph module "
                                "cannot be pickled)")
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
                                f"{first_line(exc)}); "
                                "give --input-shape") from None

    prep = None
    if any(p is not None and p.is_dir() for p in (calib, tune["data"])):
        if embedded:
            from .embedded import MEAN, STD

            image_opts = dict(image_opts, mean=image_opts["mean"] or (MEAN,), std=image_opts["std"] or (STD,))
        first = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else torch.empty(0)
        prep = ImagePreprocessing.for_input(tuple(first.shape), **image_opts)
    elif any(v is not None for v in image_opts.values()):
        raise SeparifyError("--image-size, --resize, --mean and --std apply to image folders; give a folder to "
                            "--calib or --finetune")

    calibration = None
    if calib is not None and prep is not None and calib.is_dir():
        calibration, _, classes = load_image_folder(calib, **asdict(prep), limit=calib_limit)
        console.print(f"Calibration data: {calib} ({_images(calibration, classes)}; {prep.describe()})", markup=False,
                      highlight=False, soft_wrap=True)
    elif calib is not None:
        calibration = load_tensor_file(calib)
        console.print(f"Calibration data: {calib} ({min(len(calibration), calib_limit)} samples of shape "
                      f"{tuple(calibration.shape[1:])})")
    tune_data = _finetune_data(console, model, tune, prep) if tune["data"] is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same messages are in result.warnings, printed by the report
        result = convert_model(model, cfg, example_inputs=inputs, progress=True, calibration=calibration)
    if not result.layers:
        raise SeparifyError("the model has no Conv2d layers; nothing to convert")
    if tune_data is not None:
        _finetune(console, model, result.model, tune, seed, *tune_data)
    elif tune["epochs"] is not None or tune["steps"] is not None or tune["checkpoint"] is not None:
        raise SeparifyError("--epochs, --steps and --checkpoint need --finetune DATA")

    if embedded:
        evaluations.append(Evaluation("top-1 accuracy (held-out)", accuracy(model, images, labels),
                                      accuracy(result.model, images, labels)))
    else:
        evaluations.append(Evaluation("output rel. error vs original (example input)", None,
                                      output_error(model, result.model, inputs)))
    print_report(result, tuple(evaluations), console)
    save_model(result.model, out, inputs)
    how = ("torch.export.load(path).module()" if out.suffix == ".pt2"
           else "torch.load(path, weights_only=False)  # needs separify installed")
    console.print(f"wrote {out}  (load with: {how})")


def _images(x, classes) -> str:
    return f"{len(x)} images" + (f" in {len(classes)} classes" if classes is not None else "")


def _finetune_data(console, teacher, tune, prep):
    """Fine-tuning inputs and labels, loaded before the conversion so that bad data fails fast."""
    data = tune["data"]
    if prep is None or not data.is_dir():
        return load_labeled_file(data)
    x, y, classes = load_image_folder(data, **asdict(prep))
    if classes is not None:
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


def _finetune(console, teacher, student, tune, seed, x, y) -> None:
    from .finetune import finetune

    if tune["batch_size"] <= 0:
        raise SeparifyError(f"--batch-size must be a positive integer, got {tune['batch_size']}")
    epochs = tune["epochs"] if tune["epochs"] is not None or tune["steps"] is not None else 1
    batches = [(x[i : i + tune["batch_size"]],) + ((y[i : i + tune["batch_size"]],) if y is not None else ())
               for i in range(0, len(x), tune["batch_size"])]
    console.print(f"Fine-tuning on {tune['data']}: {len(x)} samples, {'with' if y is not None else 'without'} labels")
    res = finetune(student, teacher, batches, epochs=epochs, steps=tune["steps"], lr=tune["lr"], seed=seed,
                   checkpoint=tune["checkpoint"], progress=True)
    student.eval()
    if res.losses:
        console.print(f"fine-tuned {res.steps} steps" + (f" (resumed at step {res.resumed_from})"
                      if res.resumed_from is not None else "") + f": loss {res.losses[0]:.4f} → {res.losses[-1]:.4f}")
    if res.stopped:
        console.print(f"[yellow]warning:[/yellow] {res.stopped}")


def run() -> None:  # console-script entry point
    app(prog_name="separify")


if __name__ == "__main__":
    run()
