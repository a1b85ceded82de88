"""Fine-tuning a CTC text recogniser from the command line: ``separify convert --ctc-blank 0 --finetune``.

For each target, on the OCR benchmark network (:mod:`second_model`), this writes the network as a ``.pt2``, its
256 calibration images, the 9,600 fine-tuning images of ``bench_finetune_defaults.py`` (no labels) and the 500
evaluation images with their strings as CTC targets, then runs, as a user would::

    separify convert ocr.pt2 -o out.pt2 --objective flops --method pw-dw-pw --flops F --calib calib.npy \\
        --ctc-blank 0 --finetune tune.npy --data eval.npz --no-timing --no-layers --json report.json

and reads the written model back to measure its word accuracy (``second_model.evaluate``: greedy CTC, lower-cased,
the benchmark's metric). The report's "sequence accuracy (greedy CTC)" is the exact match of class indices, so
it counts a word decoded in the other case as wrong. Every fine-tuning setting is the CLI's default (one epoch,
batch ``separify.cli._options.FINETUNE_BATCH``, learning rate from the range test, temperature from the original's
outputs) unless ``--finetune-batch-size`` is given. A target the whole model cannot reach is the same fraction of
its convertible convs' FLOPs (``bench_calibration._whole_target``).

Usage: ``python benchmarks/cli_ctc_finetune.py [--targets 0.5,0.25] [--finetune-batch-size B] [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import separify
from _common import write_result
from separify.io.models import save_model

sys.path.insert(0, str(Path(__file__).parent))
import second_model as sm  # noqa: E402
from bench_accuracy import ocr_setup  # noqa: E402
from bench_calibration import _whole_target  # noqa: E402

TUNE = 9600


def _files(work: Path, setup: dict) -> dict[str, Path]:
    """The network and the three data files, written once."""
    paths = {k: work / n for k, n in (("model", "ocr.pt2"), ("calib", "calib.npy"), ("tune", "tune.npy"),
                                        ("eval", "eval.npz"))}
    save_model(setup["model"], paths["model"], (setup["example"],))
    np.save(paths["calib"], setup["calib"][:256].numpy())
    np.save(paths["tune"], torch.cat(setup["tune"]).numpy())
    x, words = sm.eval_set(500)
    np.savez(paths["eval"], images=x.numpy(), labels=sm.ctc_targets(list(words)).numpy())
    return paths


class _Loaded(torch.nn.Module):
    """A module loaded from a ``.pt2`` program, which refuses ``eval()``/``train()``: those become no-ops here
    (the program was exported in eval mode)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.program = torch.export.load(str(path)).module()

    def train(self, mode: bool = True) -> "_Loaded":
        return self

    def forward(self, x):
        return self.program(x)


def _row(paths: dict[str, Path], work: Path, target: float, label: str, batch: int | None) -> str:
    out, rep = work / f"out_{target:.4f}.pt2", work / f"report_{target:.4f}.json"
    cmd = ["separify", "convert", str(paths["model"]), "-o", str(out), "--objective", "flops", "--method", "pw-dw-pw",
           "--flops", f"{target:.6f}", "--calib", str(paths["calib"]), "--ctc-blank", "0", "--finetune",
           str(paths["tune"]), "--data", str(paths["eval"]), "--no-timing", "--no-layers", "--json", str(rep), "--force"]
    cmd += ["--finetune-batch-size", str(batch)] if batch else []
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stdout}\n{run.stderr}")
    print(run.stdout, flush=True)
    text = " ".join(run.stdout.split())  # the terminal's lines joined
    tuned = text[text.index("fine-tuned "):].split(" │")[0].split(" Layers")[0] if "fine-tuned " in text else "?"
    rows = {q["metric"]: q for q in json.loads(rep.read_text())["quality"]}
    seq = rows["sequence accuracy (greedy CTC)"]
    words = sm.evaluate(_Loaded(out), 500)
    return (f"| {label} | {seq['original']['value']:.3f} → {seq['converted']['value']:.3f} | **{words:.3f}** | "
            f"{seconds:.0f} s | {tuned} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="0.5,0.25")
    ap.add_argument("--finetune-batch-size", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/cli_ctc_finetune[_bB].md")
    args = ap.parse_args()
    batch = f"_b{args.finetune_batch_size}" if args.finetune_batch_size else ""
    args.out = args.out or Path(f"benchmarks/results/cli_ctc_finetune{batch}_2026-12-06.md")
    setup = ocr_setup(TUNE)
    lines = [f"Command: `python benchmarks/cli_ctc_finetune.py --targets {args.targets}"
             + (f" --finetune-batch-size {args.finetune_batch_size}" if args.finetune_batch_size else "")
             + f"`; CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}, separify {separify.__version__}.", "",
             f"{setup['name']}; original word accuracy **{setup['evaluate'](setup['model']):.3f}**. Fine-tuning: "
             f"one epoch over {TUNE:,} images without labels, labelled by the original's greedy decodings "
             "(`--ctc-blank 0`).", "",
             "| target | report: sequence accuracy, original → converted | word accuracy of the written model | "
             "command wall time | fine-tuning |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        paths = _files(Path(tmp), setup)
        for t in (float(t) for t in args.targets.split(",")):
            whole, label = _whole_target(setup, t)
            lines.append(_row(paths, Path(tmp), whole, label, args.finetune_batch_size))
            print(lines[-1], flush=True)
    write_result(args.out, lines)


if __name__ == "__main__":
    main()
