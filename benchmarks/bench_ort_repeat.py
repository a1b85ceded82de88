"""The embedded model's whole-model ONNX Runtime latency ratio, measured again and again over a few minutes.

Run from the repository root (``pip install -e '.[bench]'`` first)::

    python benchmarks/bench_ort_repeat.py [--rounds 40] [--threads 2] [--out benchmarks/results/ort_repeat.md]

Converts the embedded model once with ``objective="latency"`` on the ``onnxruntime`` target (FLOPs 0.5, batch 1),
exports both models to ONNX once, then in each round times both files in ONNX Runtime (1 s each, alternating turns,
intra-op spinning on, as the report does) and, with spinning off, each file again (0.5 s each, block-interleaved,
as separify times single layers). One line per round, then the spread. The embedded model's whole run takes about
0.2 ms at batch 1, where how quickly ONNX Runtime's second intra-op thread answers decides much of the time; this
shows how much that varies on the machine at hand from one minute to the next.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402

import separify  # noqa: E402
from separify.io.embedded import load_default_model  # noqa: E402
from separify.planning.latency import LatencyTarget  # noqa: E402
from separify.core.measure import cpu_name, export_onnx, time_onnxruntime  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/ort_repeat.md"))
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, x = load_default_model().eval(), torch.randn(1, 1, 28, 28)
    target = LatencyTarget("onnxruntime", batch_size=1, threads=args.threads)
    res = separify.convert(model, example_inputs=x, objective="latency", target=target, latency_cache=False)
    lines = [f"Machine: {cpu_name()} ({platform.machine()}), {args.threads} threads; torch {torch.__version__}; "
             f"onnxruntime {__import__('onnxruntime').__version__}; batch 1, float32", "",
             f"Command: python benchmarks/bench_ort_repeat.py --rounds {args.rounds} --threads {args.threads}", "",
             f"Embedded model, `objective='latency'`, target onnxruntime, FLOPs ratio {res.flops_ratio:.3f} "
             f"({len(res.converted)}/{len(res.layers)} layers converted: "
             + ", ".join(f"{r.name} rank {r.rank}" for r in res.converted)
             + f"); convert's own whole-model check: {res.latency_ratio:.3f}.", "",
             "| time | ms original | ms converted | ratio (spinning on) | ms original, no spinning | ms converted, "
             "no spinning | ratio (no spinning) |", "|---|---|---|---|---|---|---|"]
    ratios, ratios_nospin = [], []
    with tempfile.TemporaryDirectory() as tmp:
        paths = [f"{tmp}/original.onnx", f"{tmp}/converted.onnx"]
        export_onnx(model, (x,), paths[0])
        export_onnx(res.model.eval(), (x,), paths[1])
        for _ in range(args.rounds):
            a, b = time_onnxruntime(paths, [x], threads=args.threads, min_run_time=1.0)
            c, d = time_onnxruntime(paths, [x], threads=args.threads, min_run_time=0.5, spinning=False)
            ratios.append(b.median_ms / a.median_ms)
            ratios_nospin.append(d.median_ms / c.median_ms)
            lines.append(f"| {time.strftime('%H:%M:%S')} | {a.median_ms:.3f} | {b.median_ms:.3f} | {ratios[-1]:.3f} "
                         f"| {c.median_ms:.3f} | {d.median_ms:.3f} | {ratios_nospin[-1]:.3f} |")
            print(lines[-1], flush=True)
    for label, r in (("spinning on", ratios), ("no spinning", ratios_nospin)):
        lines += ["", f"Ratio converted / original, {label}: median {statistics.median(r):.3f}, min {min(r):.3f}, "
                      f"max {max(r):.3f}; latency / FLOPs ratio at the median {statistics.median(r) / res.flops_ratio:.2f}; "
                      f"{sum(v <= 1.2 * res.flops_ratio for v in r)}/{len(r)} rounds within 1.2× of the FLOPs ratio."]
    write_result(args.out, lines)


if __name__ == "__main__":
    main()
