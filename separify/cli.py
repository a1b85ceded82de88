"""``separify`` command line: parses options and calls the library; nothing else lives here.

Every error a user can cause is printed as one ``error:`` line on stderr with exit code 1 (2 for usage errors
reported by the parser). The input file is only ever read.
"""

from __future__ import annotations

import os
import sys
import warnings
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
from .model_io import check_output_path, load_labeled_file, load_model, load_tensor_file, parse_shape, save_model
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
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration inputs (.npy/.npz/.pt, shape (N, ...), "
                                         "preprocessed as the model expects): refit each replacement to the original "
                                         "layer's outputs on them."),
    calib_limit: int = typer.Option(1000, "--calib-limit", help="Use at most this many calibration samples."),
    finetune_data: Optional[Path] = typer.Option(None, "--finetune", help="Fine-tune the converted model by "
                                                 "distillation from the original on these inputs (.npy/.npz/.pt; "
                                                 "labels used when the .npz/.pt has a 'labels' entry)."),
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
        _convert(model, output, method, rank, energy, flops, input_shape, exclude or [], arch, allow_pickle, force,
                 fold_bn, cp_iters, seed, calib, calib_limit,
                 dict(data=finetune_data, epochs=epochs, steps=steps, lr=lr, batch_size=batch_size,
                      checkpoint=checkpoint))
    except SeparifyError as exc:
        _fail(str(exc))
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception as exc:  # never a bare traceback; SEPARIFY_DEBUG=1 shows it
        if os.environ.get("SEPARIFY_DEBUG"):
            raise
        _fail(f"unexpected {type(exc).__name__}: {exc} (set SEPARIFY_DEBUG=1 for the traceback)")


def _convert(model_path, output, method, rank, energy, flops, input_shape, exclude, arch, allow_pickle, force,
             fold_bn, cp_iters, seed, calib, calib_limit, tune) -> None:
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

    calibration = None
    if calib is not None:
        calibration = load_tensor_file(calib)
        console.print(f"Calibration data: {calib} ({min(len(calibration), calib_limit)} samples of shape "
                      f"{tuple(calibration.shape[1:])})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same messages are in result.warnings, printed by the report
        result = convert_model(model, cfg, example_inputs=inputs, progress=True, calibration=calibration)
    if not result.layers:
        raise SeparifyError("the model has no Conv2d layers; nothing to convert")
    if tune["data"] is not None:
        _finetune(console, model, result.model, tune, seed)
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


def _finetune(console, teacher, student, tune, seed) -> None:
    from .finetune import finetune

    x, y = load_labeled_file(tune["data"])
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
