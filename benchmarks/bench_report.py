"""FLOPs ratio against measured latency ratio: torchvision ResNet-18 / ResNet-50 (random weights) and the embedded
model, in PyTorch eager and ONNX Runtime on the CPU, with ``separify.compare`` (the same code as
``separify compare``).

Run from the repository root (after ``pip install -e '.[test]'``)::

    python benchmarks/bench_report.py [--models resnet18,resnet50,embedded] [--threads 2] [--batch-sizes 1,32]
                                      [--min-time 2] [--out benchmarks/results/latency_vs_flops.md]

For every model, batch size and setting (``pw-dw-pw`` and ``dw-pw`` at FLOPs 0.5, and ``dw-pw`` at rank 1, i.e.
every dense 3×3 conv replaced by a depthwise 3×3 with multiplier 1 plus a 1×1), both models are timed in the same
run, one after the other: median of timed blocks after warm-up, ``--min-time`` seconds each; a ratio whose timings
were noisy (IQR above 10% of the median) is marked ``*``. Prints a markdown table and writes it to ``--out``; the
machine is named in the output. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

import separify
from _common import write_result
from separify.core.measure import Timing, cpu_name

warnings.filterwarnings("ignore")

SETTINGS = ({"method": "pw-dw-pw", "flops": 0.5}, {"method": "dw-pw", "flops": 0.5}, {"method": "dw-pw", "rank": 1})


def _model(name: str, batch: int):
    if name == "embedded":
        from separify.io.embedded import load_default_model, load_eval_data

        x, _ = load_eval_data(limit=batch)
        return load_default_model().eval(), x[:1]
    import torchvision

    return getattr(torchvision.models, name)().eval(), torch.randn(1, 3, 224, 224)


def _cell(lat) -> str:
    if lat is None or lat.ratio is None:
        return "not measured"
    noisy = any(isinstance(t, Timing) and t.noisy for t in (lat.original, lat.converted))
    return f"{lat.ratio:.2f}{'*' if noisy else ''}"


def _ms(t) -> str:
    return f"{t.median_ms:.1f}" if isinstance(t, Timing) else "—"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet18,resnet50,embedded")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--min-time", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/latency_vs_flops.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    start = time.perf_counter()
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            model, x = _model(name, batch)
            comp = separify.compare(model, SETTINGS, example_inputs=x, batch_size=batch, threads=args.threads,
                                    min_run_time=args.min_time, random_samples=8)
            for label, _, rep in comp.runs:
                lat = {t.backend: t for t in rep.latency}
                eager, ort = lat.get("torch-cpu"), lat.get("onnxruntime-cpu")
                rows.append(f"| {name} | {batch} | {label} | {rep.flops_ratio:.3f} | "
                            f"{_ms(eager.original)} → {_ms(eager.converted)} | {_cell(eager)} | "
                            f"{_ms(ort.original)} → {_ms(ort.converted)} | {_cell(ort)} |")
                print(rows[-1], file=sys.stderr, flush=True)
    lines = [
        f"Latency against FLOPs: `python benchmarks/bench_report.py --models {args.models} --threads {args.threads} "
        f"--batch-sizes {args.batch_sizes} --min-time {args.min_time}`",
        f"Machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"total {time.perf_counter() - start:.0f} s. Random weights for the torchvision models (latency does not "
        "depend on the values); inputs 224×224 (embedded: 28×28). Ratios are converted / original, both timed in "
        "the same run (median of timed blocks, `*`: IQR above 10% of the median).",
        "",
        "| model | batch | setting | FLOPs ratio | torch eager ms | eager ratio | ONNX Runtime ms | ORT ratio |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    write_result(args.out, lines)


if __name__ == "__main__":
    main()
