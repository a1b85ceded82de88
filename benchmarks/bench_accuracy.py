"""Accuracy after conversion on two real trained networks: weight-space init, calibration, fine-tuning, and a peer.

Run from the repository root (``pip install -e '.[bench]'`` first; the OCR model also needs Debian's
``fonts-dejavu-core``, the embedded model's calibration data Debian's ``dataset-fashion-mnist``)::

    python benchmarks/bench_accuracy.py [--models embedded,ocr] [--out benchmarks/results/accuracy.md]

Models:

* ``embedded``: the FashionResNet shipped with separify; top-1 on the 1,000 shipped held-out test images.
  Calibration: 1,000 images of the Fashion-MNIST *training* split; fine-tuning: 1 epoch over 10,000 training
  images with labels (batch 128).
* ``ocr``: ddddocr's ``common.onnx`` text recogniser (``benchmarks/second_model.py``); word accuracy on 500 rendered
  strings. Calibration: 256 rendered images with other strings; fine-tuning: distillation only (no labels), 1 epoch
  over 1,024 rendered images (batch 32; ``--ocr-tune-images``, ``--ocr-tune-epochs``, ``--tune-temperature`` and
  ``--tune-lr`` change it).

For each model, form and global FLOPs target: the original accuracy; weight-space init (``convert`` without data);
calibration-aware init (``calibration=``, the defaults: data-aware rank allocation, alternating least squares of
each replacement's depthwise and last 1×1 conv on the layer's outputs, and the least-squares refit);
that model after ``separify.tuning.finetune``; and tensorly-torch's ``FactorizedConv.from_conv(factorization="cp",
implementation="mobilenet")`` at the same per-layer ranks as separify's weight-space pw-dw-pw (so the same FLOPs),
if tensorly-torch is installed. A second table takes the calibrated pw-dw-pw model at FLOPs 0.5 apart (refit only,
+ data-aware ranks, + ALS, + whitened decomposition). Times are wall-clock on this machine.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import separify
from _common import write_result
from separify.io.embedded import load_default_model, load_eval_data, normalize
from separify.core.measure import accuracy

warnings.filterwarnings("ignore")
FASHION = Path("/usr/share/datasets/fashion-mnist")
TARGETS = (0.5, 0.25)


def _fashion_train(n: int):
    images, labels = FASHION / "train-images-idx3-ubyte.gz", FASHION / "train-labels-idx1-ubyte.gz"
    if not (images.exists() and labels.exists()):
        return None
    with gzip.open(images) as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    with gzip.open(labels) as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)[:n]
    return normalize(x), torch.from_numpy(y.astype(np.int64))


def embedded_setup():
    model = load_default_model()
    images, labels = load_eval_data()
    train = _fashion_train(10_000)
    if train is None:
        raise SystemExit("the embedded benchmark needs Debian's dataset-fashion-mnist (apt install dataset-fashion-mnist)")
    x, y = train
    return dict(
        name="embedded FashionResNet (top-1, 1,000 held-out test images)",
        model=model, example=images[:1], evaluate=lambda m: accuracy(m, images, labels),
        calib=x[:1000], calib_note="1,000 training images",
        tune=[(x[i : i + 128], y[i : i + 128]) for i in range(0, len(x), 128)],
        tune_note="1 epoch, 10,000 labeled training images, batch 128 (79 steps), lr 1e-4", class_dim=1,
    )


def ocr_setup(tune_images: int = 1024, temperature: float = 4.0, lr: float = 1e-4, epochs: int = 1):
    sys.path.insert(0, str(Path(__file__).parent))
    import second_model as sm

    model = sm.load_model()
    # different seed stream from the calibration set; strings of the eval set excluded by construction
    tune_x = sm.calibration_inputs(256 + tune_images)[256:]
    batches = [tune_x[i : i + 32] for i in range(0, len(tune_x), 32)]
    return dict(
        name="ddddocr common.onnx text recogniser (word accuracy, 500 rendered strings)",
        model=model, example=sm.example_input(), evaluate=lambda m: sm.evaluate(m, 500),
        calib=sm.calibration_inputs(256), calib_note="256 rendered images",
        tune=batches,
        tune_note=f"{epochs} epoch{'s' if epochs > 1 else ''} over {tune_images:,} rendered images without labels "
                  f"(distillation only), batch 32 ({epochs * len(batches)} steps), lr {lr:g} (cosine schedule), "
                  f"temperature {temperature:g}",
        class_dim=-1, temperature=temperature, lr=lr, epochs=epochs,
    )


def _tltorch_peer(model: nn.Module, result: separify.ConvertResult):
    """The original model with each conv separify converted replaced by tensorly-torch's CP FactorizedConv at the
    same rank (same FLOPs; a following BatchNorm stays as it is); ``None`` if tensorly-torch is not installed."""
    try:
        import tltorch
    except ImportError:
        return None
    peer = copy.deepcopy(model)
    for rec in result.converted:
        conv = peer.get_submodule(rec.name)
        fact = tltorch.FactorizedConv.from_conv(conv, rank=rec.rank, factorization="cp", implementation="mobilenet",
                                                decompose_weights=True)
        parent, _, child = rec.name.rpartition(".")
        setattr(peer.get_submodule(parent) if parent else peer, child, fact)
    return peer.eval()


def run(setup: dict, lines: list[str], *, finetune: bool, forms=("pw-dw-pw", "dw-pw"), targets=None,
        calib_steps: int = 0) -> None:
    model, example, evaluate = setup["model"], setup["example"], setup["evaluate"]
    t0 = time.perf_counter()
    base = evaluate(model)
    lines += ["", f"### {setup['name']}", "",
              f"Original: **{base:.3f}** ({time.perf_counter() - t0:.1f} s per evaluation). Calibration: "
              f"{setup['calib_note']}" + (f", with layer-wise reconstruction (`calib_steps={calib_steps}`)"
                                          if calib_steps else "") + f". Fine-tuning: {setup['tune_note']}.", "",
              "| form | FLOPs target | FLOPs after / before | weight-space init | calibrated | + fine-tune | "
              "tensorly-torch CP (same ranks) | convert s: weight / calibrated | fine-tune s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for method in forms:
        for target in targets or TARGETS:
            t0 = time.perf_counter()
            plain = separify.convert(model, example_inputs=example, method=method, flops=target)
            t_plain = time.perf_counter() - t0
            acc_plain = evaluate(plain.model)
            t0 = time.perf_counter()
            cal = separify.convert(model, example_inputs=example, method=method, flops=target,
                                   calibration=setup["calib"], calib_steps=calib_steps)
            t_cal = time.perf_counter() - t0
            acc_cal = evaluate(cal.model)
            acc_ft, t_ft = "not run", ""
            if finetune:
                t0 = time.perf_counter()
                separify.finetune(cal.model, model, setup["tune"], epochs=setup.get("epochs", 1),
                                  lr=setup.get("lr", 1e-4), seed=0, class_dim=setup["class_dim"],
                                  temperature=setup.get("temperature", 4.0))
                t_ft = f"{time.perf_counter() - t0:.0f}"
                cal.model.eval()
                acc_ft = f"{evaluate(cal.model):.3f}"
            peer = "n/a (dw-pw)"
            if method == "pw-dw-pw":
                t0 = time.perf_counter()
                p = _tltorch_peer(model, plain)
                peer = "not installed" if p is None else f"{evaluate(p):.3f} ({time.perf_counter() - t0:.0f} s)"
            reached = f"{cal.flops_ratio:.3f}" + (" (unreachable)" if cal.warnings else "")
            lines.append(f"| {method} | {target} | {reached} | {acc_plain:.3f} | {acc_cal:.3f} | {acc_ft} | {peer} | "
                         f"{t_plain:.1f} / {t_cal:.1f} | {t_ft} |")
            print(lines[-1], flush=True)


def ablation(setup: dict, lines: list[str]) -> None:
    model, example, evaluate = setup["model"], setup["example"], setup["evaluate"]
    lines += ["", f"Calibrated pw-dw-pw at FLOPs 0.5, taken apart ({setup['name'].split(' (')[0]}):", "",
              "| calibration settings | ranks | accuracy |", "|---|---|---|"]
    for label, opts in (
        ("none (weight-space init)", None),
        ("refit only (`calib_ranks=False, calib_als=0`)", dict(calib_ranks=False, calib_als=0)),
        ("refit + data-aware ranks (`calib_als=0`)", dict(calib_als=0)),
        ("refit + data-aware ranks + ALS (default)", dict()),
        ("refit + data-aware ranks + ALS + whitened decomposition (`calib_whiten=True`)", dict(calib_whiten=True)),
        ("refit + whitened decomposition (`calib_ranks=False, calib_whiten=True, calib_als=0`)",
         dict(calib_ranks=False, calib_whiten=True, calib_als=0)),
    ):
        extra = {} if opts is None else dict(calibration=setup["calib"], **opts)
        res = separify.convert(model, example_inputs=example, method="pw-dw-pw", flops=0.5, **extra)
        lines.append(f"| {label} | {', '.join(str(r.rank) for r in res.converted)} | {evaluate(res.model):.3f} |")
        print(lines[-1], flush=True)


def longer_finetune(setup: dict, lines: list[str], n_images: int, *, lr: float = 1e-4, temperature: float = 4.0,
                    feature_weight: float = 0.0, calib_steps: int = 0) -> None:
    """The calibrated pw-dw-pw model at FLOPs 0.5 fine-tuned for one epoch over ``n_images`` fresh rendered images
    (OCR only): how far more distillation goes, and with which settings."""
    sys.path.insert(0, str(Path(__file__).parent))
    import second_model as sm

    model, example, evaluate = setup["model"], setup["example"], setup["evaluate"]
    x = sm.calibration_inputs(256 + n_images)[256:]
    batches = [x[i : i + 32] for i in range(0, len(x), 32)]
    cal = separify.convert(model, example_inputs=example, method="pw-dw-pw", flops=0.5, calibration=setup["calib"],
                           calib_steps=calib_steps)
    acc_cal = evaluate(cal.model)
    t0 = time.perf_counter()
    out = separify.finetune(cal.model, model, batches, epochs=1, lr=lr, seed=0, class_dim=setup["class_dim"],
                            temperature=temperature, features=cal.feature_pairs(), feature_weight=feature_weight)
    dt = time.perf_counter() - t0
    cal.model.eval()
    lines += ["", f"Longer fine-tuning, OCR, pw-dw-pw at FLOPs 0.5: 1 epoch over {n_images:,} rendered images "
              f"(batch 32, {out.steps} steps, lr {lr:g}, temperature {temperature:g}, feature weight "
              f"{feature_weight:g}, no labels; calibration with `calib_steps={calib_steps}`): calibrated {acc_cal:.3f} → "
              f"{evaluate(cal.model):.3f} ({dt:.0f} s; original {evaluate(model):.3f})."]
    print(lines[-1], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="embedded,ocr")
    ap.add_argument("--no-finetune", action="store_true")
    ap.add_argument("--forms", default="pw-dw-pw,dw-pw")
    ap.add_argument("--targets", default=None, help="FLOPs targets, comma-separated (default 0.5,0.25)")
    ap.add_argument("--calib-steps", type=int, default=0, help="layer-wise reconstruction steps in the calibrated runs")
    ap.add_argument("--no-ablation", action="store_true")
    ap.add_argument("--long-tune", type=int, default=0, help="OCR only: just the longer fine-tune, over N images")
    ap.add_argument("--tune-lr", type=float, default=1e-4)
    ap.add_argument("--tune-temperature", type=float, default=4.0)
    ap.add_argument("--tune-feature-weight", type=float, default=0.0)
    ap.add_argument("--ocr-tune-images", type=int, default=1024, help="OCR fine-tuning set (batch 32); "
                    "--tune-lr, --tune-temperature and --ocr-tune-epochs apply to it too")
    ap.add_argument("--ocr-tune-epochs", type=int, default=1, help="OCR fine-tuning epochs over that set")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/accuracy.md"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    import platform

    argv = sys.argv[1:]
    flags = " ".join(a for i, a in enumerate(argv) if not a.startswith("--out") and (i == 0 or argv[i - 1] != "--out"))
    lines = [f"Command: `python benchmarks/bench_accuracy.py {flags}`; {torch.get_num_threads()} "
             f"threads, CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
             f"separify {separify.__version__}."]
    setups = {"embedded": embedded_setup,
              "ocr": lambda: ocr_setup(args.ocr_tune_images, args.tune_temperature, args.tune_lr, args.ocr_tune_epochs)}
    if args.long_tune:
        lines[0] = lines[0].replace(f"`python benchmarks/bench_accuracy.py {flags}`",
                                    f"`python benchmarks/bench_accuracy.py --long-tune {args.long_tune} --tune-lr "
                                    f"{args.tune_lr:g} --tune-temperature {args.tune_temperature:g} "
                                    f"--tune-feature-weight {args.tune_feature_weight:g} --calib-steps {args.calib_steps}`")
        longer_finetune(ocr_setup(0), lines, args.long_tune, lr=args.tune_lr, temperature=args.tune_temperature,
                        feature_weight=args.tune_feature_weight, calib_steps=args.calib_steps)
        write_result(args.out, lines)
        return
    for name in args.models.split(","):
        setup = setups[name]()
        run(setup, lines, finetune=not args.no_finetune, forms=tuple(args.forms.split(",")),
            targets=tuple(float(t) for t in args.targets.split(",")) if args.targets else None,
            calib_steps=args.calib_steps)
        if not args.no_ablation:
            ablation(setup, lines)
    write_result(args.out, lines)


if __name__ == "__main__":
    main()
