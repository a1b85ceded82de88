"""One-off GPU check: calibration and AMP fine-tuning on CUDA, and dense vs separable latency on the GPU.

Run on a machine with an NVIDIA GPU, from the repository root (separify importable, e.g. ``PYTHONPATH=.``)::

    python benchmarks/gpu_check.py --data DIR --out RESULT.md

``DIR`` holds ``fashion_train.pt`` (``{"images": uint8 (n, 28, 28), "labels": int64 (n,)}``, the first images of
the Fashion-MNIST training split; written by ``--prepare DIR`` on a machine with Debian's dataset-fashion-mnist).

1. The embedded model on CUDA: ``convert`` with calibration (pw-dw-pw, FLOPs 0.25, 1,000 training images) run
   entirely on the GPU, then ``finetune`` for one epoch over 10,000 training images with bf16 autocast (``amp``,
   the default on CUDA) and without it; top-1 on the 1,000 shipped held-out images after each step.
2. Latency of torchvision resnet18/resnet50 (random weights) before and after conversion (dw-pw rank 1, pw-dw-pw
   FLOPs 0.5), batch 1 and 64, fp32 and bf16, channels-last: CUDA events around each forward, 10 warm-ups,
   median and min/max of 30 runs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import separify
from separify.io.embedded import load_default_model, load_eval_data, normalize
from separify.core.measure import accuracy

warnings.filterwarnings("ignore")


def prepare(folder: Path, n: int = 11_000) -> None:
    src = Path("/usr/share/datasets/fashion-mnist")
    with gzip.open(src / "train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n].copy()
    with gzip.open(src / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n].astype(np.int64)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"images": torch.from_numpy(images), "labels": torch.from_numpy(labels)}, folder / "fashion_train.pt")


def embedded_on_cuda(data: Path, lines: list[str], record: dict, device: str = "cuda", tune: int = 10_000) -> None:
    dev = torch.device(device)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    train = torch.load(data / "fashion_train.pt")
    x = normalize(train["images"]).to(dev)
    y = train["labels"].to(dev)
    images, labels = load_eval_data()
    images, labels = images.to(dev), labels.to(dev)
    model = load_default_model().to(dev)
    base = accuracy(model, images, labels)
    t0 = time.perf_counter()
    res = separify.convert(model, example_inputs=images[:1], method="pw-dw-pw", flops=0.25, calibration=x[:1000])
    sync()
    t_conv = time.perf_counter() - t0
    devices = {str(p.device) for p in res.model.parameters()}
    acc_cal = accuracy(res.model, images, labels)
    lines += [f"Embedded model on {name}: original top-1 {base:.3f}; convert with "
              f"calibration (pw-dw-pw, FLOPs 0.25 → {res.flops_ratio:.3f}, 1,000 images) on the GPU in {t_conv:.1f} s, "
              f"parameters on {sorted(devices)}, top-1 {acc_cal:.3f}.", "",
              "| fine-tune (1 epoch, 10,000 images, batch 128, lr 1e-4) | top-1 | first / last loss | time (s) | "
              "parameter dtypes after |", "|---|---|---|---|---|"]
    record["embedded"] = dict(original=base, calibrated=acc_cal, flops_ratio=res.flops_ratio, convert_s=t_conv,
                              devices=sorted(devices))
    batches = [(x[i : i + 128], y[i : i + 128]) for i in range(1000, 1000 + tune, 128)]
    for amp in (True, False):
        student = separify.convert(model, example_inputs=images[:1], method="pw-dw-pw", flops=0.25,
                                   calibration=x[:1000]).model
        sync()
        t0 = time.perf_counter()
        out = separify.finetune(student, model, batches, epochs=1, lr=1e-4, seed=0, amp=amp)
        sync()
        dt = time.perf_counter() - t0
        student.eval()
        acc = accuracy(student, images, labels)
        dtypes = sorted({str(p.dtype) for p in student.parameters()})
        finite = all(np.isfinite(out.losses))
        lines.append(f"| {'bf16 autocast (amp=True)' if amp else 'fp32 (amp=False)'} | {acc:.3f} | "
                     f"{out.losses[0]:.3f} / {out.losses[-1]:.3f}{'' if finite else ' (non-finite!)'} | {dt:.1f} | "
                     f"{', '.join(dtypes)} |")
        record[f"finetune_amp_{amp}"] = dict(top1=acc, first_loss=out.losses[0], last_loss=out.losses[-1],
                                             steps=out.steps, seconds=dt, dtypes=dtypes, finite=finite,
                                             stopped=out.stopped)
        print(lines[-1], flush=True)


def _time_cuda(model, x, warmup: int = 10, runs: int = 30) -> list[float]:
    with torch.no_grad():
        for _ in range(warmup):
            model(x)
        torch.cuda.synchronize()
        times = []
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return times


def latency(lines: list[str], record: dict) -> None:
    import torchvision

    lines += ["", f"Latency on {torch.cuda.get_device_name()} (torch {torch.__version__}, cuDNN "
              f"{torch.backends.cudnn.version()}, eager, channels-last; CUDA events, 10 warm-ups, median [min–max] of "
              "30 forwards, ms; ratio = converted / dense median):", "",
              "| model | form | FLOPs ratio | dtype | batch | dense ms | converted ms | ratio |",
              "|---|---|---|---|---|---|---|---|"]
    torch.backends.cudnn.benchmark = True
    for arch in ("resnet18", "resnet50"):
        torch.manual_seed(0)
        dense = getattr(torchvision.models, arch)().eval()
        x1 = torch.randn(1, 3, 224, 224)
        for label, opts in (("dw-pw K=1", dict(method="dw-pw", rank=1)), ("pw-dw-pw FLOPs 0.5",
                                                                           dict(method="pw-dw-pw", flops=0.5))):
            res = separify.convert(dense, example_inputs=x1, **opts)
            for dtype in (torch.float32, torch.bfloat16):
                a = dense.to("cuda", dtype).to(memory_format=torch.channels_last)
                b = res.model.to("cuda", dtype).to(memory_format=torch.channels_last)
                for batch in (1, 64):
                    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=dtype).to(
                        memory_format=torch.channels_last)
                    ta, tb = _time_cuda(a, x), _time_cuda(b, x)
                    ma, mb = statistics.median(ta), statistics.median(tb)
                    lines.append(f"| {arch} | {label} | {res.flops_ratio:.3f} | {str(dtype)[6:]} | {batch} | "
                                 f"{ma:.3f} [{min(ta):.3f}–{max(ta):.3f}] | {mb:.3f} [{min(tb):.3f}–{max(tb):.3f}] | "
                                 f"{mb / ma:.2f} |")
                    record.setdefault("latency", []).append(dict(model=arch, form=label, flops_ratio=res.flops_ratio,
                                                                 dtype=str(dtype), batch=batch, dense_ms=ta,
                                                                 converted_ms=tb))
                    print(lines[-1], flush=True)
            dense = dense.to("cpu", torch.float32).to(memory_format=torch.contiguous_format)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepare", type=Path)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--out", type=Path, default=Path("gpu_check.md"))
    ap.add_argument("--smoke-cpu", action="store_true", help="check the script itself on the CPU (small, no latency)")
    args = ap.parse_args()
    if args.prepare:
        prepare(args.prepare)
        return
    if args.smoke_cpu:
        lines, record = [], {}
        embedded_on_cuda(args.data, lines, record, device="cpu", tune=512)
        print("\n".join(lines))
        return
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    lines = [f"Command: `python benchmarks/gpu_check.py --data DIR`; {torch.cuda.get_device_name()}, torch "
             f"{torch.__version__}, separify {separify.__version__}.", ""]
    record: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        embedded_on_cuda(args.data, lines, record)
    except Exception as exc:  # report and go on to the latency part
        lines.append(f"embedded check FAILED: {type(exc).__name__}: {exc}")
        record["embedded_error"] = f"{type(exc).__name__}: {exc}"
        print(lines[-1], flush=True)
    latency(lines, record)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
