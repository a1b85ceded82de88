"""Conversion time of torchvision ResNet-50 (random weights), and the peers, on this machine.

Run from the repository root (after ``pip install -e '.[bench]'``)::

    python benchmarks/bench_convert.py [--threads 2] [--out benchmarks/results/convert_resnet50.md]

Prints a markdown table and writes it to ``--out``. Measured:

1. ``separify.convert`` on ResNet-50 (eval mode, example input 1×3×224×224), wall time of the whole call (tracing,
   FLOP counting, BatchNorm folding, rank allocation, decomposition, rewrite), for each form at a fixed rank and at
   ``flops=0.5``; best of ``--repeat`` runs.
2. The peer: tensorly-torch's ``FactorizedConv.from_conv(conv, rank=R, factorization='cp',
   implementation='mobilenet')`` (the same pw → dw → pw structure) on the six 256-channel 3×3 convs of ``layer3``
   at the ranks separify chose for ``pw-dw-pw, flops=0.75`` (so matched FLOPs), if tensorly-torch is installed.
3. ``separify.convert`` with calibration data (``--calib-images`` random 224² images: the time does not depend
   on what the images show), one run each: the observing pass over the original model, the data-aware allocation
   and the one-pass least-squares refit with the alternating least squares (`calib_als`, default 10) included,
   and once more with `calib_als=0` for its cost.
4. One CP fit of a 512×512×3×3 kernel at rank 1100 (half the dense FLOPs of that layer): separify's ALS vs
   ``tensorly.decomposition.parafac`` (pytorch backend), same number of sweeps; the reason separify has its own ALS.

Nothing here is a test: figures depend on the machine, which the output names.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import torch
import torchvision

import separify
from _common import write_result
from separify.core.decompose import cp_decompose
from separify.core.measure import cpu_name

warnings.filterwarnings("ignore")


def _best(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/convert_resnet50.md"))
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--calib-images", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 224, 224)
    lines = [
        f"Machine: {cpu_name()}, {os.cpu_count()} cores visible, torch {torch.__version__} on CPU with "
        f"{torch.get_num_threads()} threads; separify {separify.__version__}.",
        "Command: `python benchmarks/bench_convert.py --threads {} --repeat {}`".format(args.threads, args.repeat),
        "",
        "| model | method | ranks | converted layers | FLOPs after / before | mean kernel error | convert time (s) | "
        "warning |",
        "|---|---|---|---|---|---|---|---|",
    ]
    # flops=0.5 is below what ResNet-50 can reach by converting 3×3 convs alone (its 1×1 convs, never converted,
    # hold about half of its FLOPs): every layer then gets rank 1 and separify warns. 0.75 shows the allocation.
    settings = [("dw-pw", {"rank": 2}), ("dw-pw", {"flops": 0.5}), ("dw-pw", {"flops": 0.75}),
                ("pw-dw-pw", {"rank": 128}), ("pw-dw-pw", {"flops": 0.5}), ("pw-dw-pw", {"flops": 0.75})]
    peer_ranks_from = None
    for method, sel in settings:
        seconds, res = _best(lambda: separify.convert(model, example_inputs=x, method=method, **sel), args.repeat)
        conv = res.converted
        err = sum(r.rel_error for r in conv) / max(len(conv), 1)
        label = ", ".join(f"{k}={v}" for k, v in sel.items())
        lines.append(f"| resnet50 | {method} | {label} | {len(conv)}/{len(res.layers)} | {res.flops_ratio:.3f} | "
                     f"{err:.3f} | {seconds:.2f} | {'; '.join(res.warnings)} |")
        print(lines[-1], flush=True)
        if method == "pw-dw-pw" and sel.get("flops") == 0.75:
            peer_ranks_from = res

    lines += ["", f"With calibration ({args.calib_images} random 1×3×224×224 images; one run each):", "",
              "| model | method | ranks | FLOPs after / before | convert time without / with calibration (s) | "
              "with calibration, `calib_als=0` (s) |",
              "|---|---|---|---|---|---|"]
    calib = torch.randn(args.calib_images, 3, 224, 224)
    for method, sel in (("dw-pw", {"rank": 2}), ("pw-dw-pw", {"flops": 0.75})):
        plain_s, _ = _best(lambda: separify.convert(model, example_inputs=x, method=method, **sel), 1)
        cal_s, res = _best(lambda: separify.convert(model, example_inputs=x, method=method, calibration=calib,
                                                    **sel), 1)
        no_als_s, _ = _best(lambda: separify.convert(model, example_inputs=x, method=method, calibration=calib,
                                                     calib_als=0, **sel), 1)
        label = ", ".join(f"{k}={v}" for k, v in sel.items())
        lines.append(f"| resnet50 | {method} | {label} | {res.flops_ratio:.3f} | {plain_s:.1f} / {cal_s:.1f} | "
                     f"{no_als_s:.1f} |")
        print(lines[-1], flush=True)

    if not args.skip_peers:
        lines += ["", "Peers on the six 256-channel 3×3 convs of resnet50.layer3 (ranks as chosen by separify for "
                  "pw-dw-pw at flops=0.75, so matched FLOPs):", "",
                  "| implementation | ranks | total time (s) | mean kernel error |", "|---|---|---|---|"]
        layers = [(f"layer3.{i}.conv2", model.get_submodule(f"layer3.{i}.conv2")) for i in range(6)]
        by_name = {r.name: r for r in peer_ranks_from.layers}
        chosen = [by_name[n].rank or 256 for n, _ in layers]
        # BN folding changes the kernels separify decomposes; decompose the raw kernels here so both see the same
        t0 = time.perf_counter()
        errs = [cp_decompose(conv.weight, r).rel_error for (_, conv), r in zip(layers, chosen)]
        ours = time.perf_counter() - t0
        lines.append(f"| separify cp_decompose (25 ALS sweeps max) | {chosen} | {ours:.2f} | "
                     f"{sum(errs) / len(errs):.3f} |")
        print(lines[-1], flush=True)
        try:
            import tltorch
        except ImportError:
            lines.append("| tensorly-torch | not installed | | |")
        else:
            t0 = time.perf_counter()
            terrs = []
            for (_, conv), r in zip(layers, chosen):
                fact = tltorch.FactorizedConv.from_conv(conv, rank=r, factorization="cp", implementation="mobilenet",
                                                        decompose_weights=True)
                w = fact.weight.to_tensor().reshape(conv.weight.shape)
                terrs.append(float((w - conv.weight).norm() / conv.weight.norm()))
            theirs = time.perf_counter() - t0
            lines.append(f"| tensorly-torch {tltorch.__version__} FactorizedConv.from_conv(cp, mobilenet) | {chosen} "
                         f"| {theirs:.2f} | {sum(terrs) / len(terrs):.3f} |")
            print(lines[-1], flush=True)

        lines += ["", "One CP fit, 512×512×3×3 random kernel, rank 1100, 5 ALS sweeps each:", "",
                  "| solver | time (s) |", "|---|---|"]
        w = torch.randn(512, 512, 3, 3)
        t0 = time.perf_counter()
        cp_decompose(w, 1100, max_iter=5, tol=0)
        lines.append(f"| separify `_ALS` (incl. closed-form starts) | {time.perf_counter() - t0:.2f} |")
        print(lines[-1], flush=True)
        try:
            import tensorly as tl
            from tensorly.decomposition import parafac
        except ImportError:
            lines.append("| tensorly parafac | not installed |")
        else:
            tl.set_backend("pytorch")
            t0 = time.perf_counter()
            parafac(w.reshape(512, 512, 9), 1100, n_iter_max=5, init="random", tol=0, random_state=0)
            lines.append(f"| tensorly {tl.__version__} parafac (pytorch backend, random init) | "
                         f"{time.perf_counter() - t0:.2f} |")
            print(lines[-1], flush=True)
            tl.set_backend("numpy")

    write_result(args.out, lines)


if __name__ == "__main__":
    main()
