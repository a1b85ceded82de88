"""The command-line options: help panels, defaults and declarations, shared by the commands.

Every default of a conversion setting is read from the library's config classes (:mod:`separify.config`), so it is
stated once; the help either shows it (``[default: ...]``, from the same value) or names it in words where the
option's own default is "not given" (``--flops``, ``--cp-iters``, ``--target``).
"""

from __future__ import annotations

import inspect

import typer
from typer.core import TyperCommand, TyperGroup

from separify.config import (CP_SWEEPS, CP_SWEEPS_BEFORE_ALS, METHODS, OBJECTIVES, RECONSTRUCTION_STEPS, Calibration,
                             ConvertConfig, LatencySettings, LatencyTarget, RankSelection)
from separify.tuning.finetune import finetune as _finetune

# --- help panels
WHAT = "What to convert"
MEASURED = "What to measure"
RANKS = "Rank selection"
CALIBRATION = "Calibration"
LATENCY = "Latency"
FINETUNE = "Fine-tuning"
REPORT = "Report and output"

# --- defaults: the library's, and those that only the command line has
LIBRARY = ConvertConfig()
RANK_DEFAULTS, CALIB_DEFAULTS, LATENCY_DEFAULTS, TARGET_DEFAULTS = (RankSelection(), Calibration(), LatencySettings(),
                                                                    LatencyTarget())
_TUNE = inspect.signature(_finetune).parameters
FINETUNE_LR, FINETUNE_TEMPERATURE = _TUNE["lr"].default, _TUNE["temperature"].default
FINETUNE_EPOCHS = 1  # with --finetune and neither --epochs nor --steps
FINETUNE_BATCH = 32  # one epoch at 32 did better than at 64 on both benchmark networks; 16 was no better on average
# (benchmarks/RESULTS.md)
DATA_LIMIT = 1000
MIN_TIME = 0.5
COMPARE_FLOPS = "0.75,0.5,0.25"
DEFAULT_OUTPUT = "fashion_separable.pt2"  # the embedded model's output without -o


class _FlagsAsFlags:
    """Help that shows flags as flags: ``--force``, not ``--force <bool>``.

    typer 0.29's rich help (``typer.rich_utils._print_options_panel``) prints every option's value type, flags
    included; only its plain-text formatter checks ``is_flag``. An empty metavar leaves the type column blank.
    """

    def format_help(self, ctx, formatter) -> None:
        for param in self.get_params(ctx):
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        super().format_help(ctx, formatter)


class Command(_FlagsAsFlags, TyperCommand):
    pass


class Group(_FlagsAsFlags, TyperGroup):
    pass


CONVERT_HELP = f"""Convert the dense k×k convs of MODEL to depthwise-separable form and print the before/after report.

Examples:

  separify convert      # the embedded model → {DEFAULT_OUTPUT}
  separify convert resnet18.pth -o resnet18_separable.pt2 \\
      --arch 'torchvision.models:resnet18(num_classes=10)' \\
      --input-shape 1,3,224,224 --flops 0.5 --calib images/
  separify convert model.onnx -o fast.onnx --objective latency --latency 0.6
  separify convert model.pt2 -o small.pt2 --config conv.toml

With --config, the options given on the command line override the file."""


# --- What to convert

def model_argument(help: str = "Model file: a torch.export .pt2, a state dict (with --arch), a "
                   "pickled module (with --allow-pickle) or an ONNX model (.onnx, converted by the ONNX pass). Omit it "
                   "to convert the embedded Fashion-MNIST model."):
    return typer.Argument(None, metavar="MODEL", help=help)


OUTPUT = typer.Option(None, "-o", "--output", rich_help_panel=WHAT, help="Where to write the converted model: .pt2 "
                      "(torch.export), .pt/.pth (pickled module) or .onnx. Default for the embedded model: "
                      f"{DEFAULT_OUTPUT} (with --to, that format's suffix).")
TO = typer.Option(None, "--to", rich_help_panel=WHAT, help="Output format: onnx, pt2 or pt (default: from the -o "
                  "suffix). ONNX models are always written as ONNX.")


def arch(panel: str = WHAT):
    return typer.Option(None, "--arch", rich_help_panel=panel, help="Architecture for a state dict, as "
                        "package.module:callable (e.g. torchvision.models:resnet18), optionally with literal keyword "
                        "arguments in parentheses, quoted for the shell (as in the examples of separify convert "
                        "--help).")


def allow_pickle(panel: str = WHAT):
    return typer.Option(False, "--allow-pickle", rich_help_panel=panel, help="Allow loading a pickled module; this "
                        "runs code from the file, so only for files you trust.")


def input_shape(panel: str = WHAT):
    return typer.Option(None, "--input-shape", rich_help_panel=panel, help="Example input shape, e.g. 1,3,224,224 "
                        "(default: stored with a .pt2, else 1,3,224,224).")


EXCLUDE = typer.Option(None, "--exclude", metavar="PATTERN", rich_help_panel=WHAT, help="Leave layers whose name matches this pattern "
                       "dense (fnmatch, e.g. 'layer4.*'); repeatable.")
FOLD_BN = typer.Option(LIBRARY.fold_bn, "--fold-bn/--no-fold-bn", rich_help_panel=WHAT, help="Fold BatchNorm into "
                       "the conv before it.")
CONFIG = typer.Option(None, "--config", rich_help_panel=WHAT, help="TOML file of conversion settings: tables ranks, "
                      "calibration, latency and cp with the fields of separify's config classes, and exclude, rules "
                      "(per-layer settings by name pattern), fold_bn, seed, tracer. Options given on the command line "
                      "override the file; the defaults shown here apply to what neither sets.")

# --- Rank selection

METHOD = typer.Option(RANK_DEFAULTS.method, "--method", "-m", rich_help_panel=RANKS,
                      help=f"Replacement form: {' | '.join(METHODS)}.")
RANK = typer.Option(None, "--rank", rich_help_panel=RANKS, help="Fixed rank for every layer (dw-pw: depthwise "
                    "multiplier K; pw-dw-pw: intermediate channels R).")
ENERGY = typer.Option(None, "--energy", rich_help_panel=RANKS, help="Per layer, keep this fraction of the kernel "
                      "energy, in (0, 1].")
FLOPS = typer.Option(None, "--flops", rich_help_panel=RANKS, help="Keep this fraction of the model's FLOPs, in (0, 1]; "
                     f"ranks are allocated across layers. Default {RANK_DEFAULTS.flops} when no rank option is given.")
CP_ITERS = typer.Option(None, "--cp-iters", rich_help_panel=RANKS, help=f"CP-ALS sweeps for pw-dw-pw (default "
                        f"{CP_SWEEPS}, or {CP_SWEEPS_BEFORE_ALS} for layers that --calib's alternating least squares "
                        "refits afterwards).")


def seed(panel: str = RANKS, help: str = "Seed for the example input and the CP solver."):
    return typer.Option(LIBRARY.seed, "--seed", rich_help_panel=panel, help=help)


# --- Calibration

def calib(help: str = "Calibration inputs: a tensor file (.npy/.npz/.pt, shape (N, ...), preprocessed as the model "
          "expects) or a folder of images (see --image-size): refit each replacement to the original layer's outputs "
          "on them."):
    return typer.Option(None, "--calib", rich_help_panel=CALIBRATION, help=help)


CALIB_LIMIT = typer.Option(CALIB_DEFAULTS.limit, "--calib-limit", rich_help_panel=CALIBRATION,
                           help="Use at most this many calibration samples.")
CALIB_STEPS = typer.Option(CALIB_DEFAULTS.steps, "--calib-steps", rich_help_panel=CALIBRATION, help="With --calib: "
                           "this many Adam steps on all factors of each replacement against the original layer's "
                           "outputs (layer-wise reconstruction) before the least-squares refit; default: "
                           f"{RECONSTRUCTION_STEPS} on pw-dw-pw layers (whose first 1×1 conv the ALS does not fit), "
                           "none on dw-pw; 0 turns it off.", show_default=False)
CALIB_OUTPUT_STEPS = typer.Option(CALIB_DEFAULTS.output_steps, "--calib-output-steps", rich_help_panel=CALIBRATION,
                                  help="With --calib: after the layer-wise fits, this many Adam steps on all "
                                  "replacements together against the original model's outputs (output "
                                  "reconstruction; one sample in 8 held out to check it, undone where it did not "
                                  "lower their error; ONNX models through onnx2torch); 0 turns it off.")
CALIB_SECONDS = typer.Option(CALIB_DEFAULTS.seconds, "--calib-seconds", rich_help_panel=CALIBRATION,
                             help="With --calib: a time budget for the conversion in seconds; the layer-wise and "
                             "output reconstructions' steps stop where it ends (the report says how many ran; the "
                             "result then depends on the machine's speed). Default and 0: no budget, every step "
                             "runs.", show_default=False)
CALIB_PRECISION = typer.Option(CALIB_DEFAULTS.precision, "--calib-precision", rich_help_panel=CALIBRATION,
                               help="With --calib: the number format of the calibration passes and the output "
                               "reconstruction's steps on PyTorch models (the output reconstruction's on ONNX models): "
                               "auto (bfloat16 where the CPU or GPU computes it natively and the work is large "
                               "enough), float32 or bfloat16.")
CALIB_ALS = typer.Option(CALIB_DEFAULTS.als, "--calib-als", rich_help_panel=CALIBRATION, help="With --calib: "
                         "iterations of alternating least squares fitting each replacement's depthwise and last 1×1 "
                         "conv to the original layer's outputs (0 skips it).")

CALIB_LOSS = typer.Option(CALIB_DEFAULTS.loss, "--calib-loss", rich_help_panel=CALIBRATION, help="With --calib and "
                          "a --flops or latency target, ranks go where errors move this loss of the model's output "
                          "most: fisher (the KL divergence of the softmax of the output logits over --class-dim), "
                          "mse (the squared change of every output) or off (every layer alike).")


CALIB_KEY = typer.Option(None, "--calib-key", rich_help_panel=CALIBRATION, help="The array of the --calib tensor "
                         "file (.npz/.pt) that holds the inputs (default: one named images, x or inputs, or its only "
                         "array; an .npz of several other arrays is read as one sample per array).")
CALIB_NATIVE_SIZE = typer.Option(False, "--calib-native-size", rich_help_panel=CALIBRATION, help="Read the --calib "
                                 "image folder at each image's own size (no resize, no crop), for models that take "
                                 "inputs of any size; default: resized and centre-cropped like --image-size.")


def image_size(panel: str = CALIBRATION):
    return typer.Option(None, "--image-size", rich_help_panel=panel, help="Image folders: centre-crop size H,W (or "
                        "one number for a square; default: the H,W of the example input).")


def resize(panel: str = CALIBRATION):
    return typer.Option(None, "--resize", rich_help_panel=panel, help="Image folders: resize the shorter side to this "
                        "before the centre crop; 0: no resize (default: max(H,W)·256/224 when max(H,W) >= 64, else "
                        "max(H,W)).")


def mean(panel: str = CALIBRATION):
    return typer.Option(None, "--mean", rich_help_panel=panel, help="Image folders: per-channel mean for normalising "
                        "pixels in [0, 1], e.g. 0.485,0.456,0.406 (default: ImageNet's for 3 channels; the training "
                        "statistics for the embedded model; 0.5 otherwise).")


def std(panel: str = CALIBRATION):
    return typer.Option(None, "--std", rich_help_panel=panel, help="Image folders: per-channel standard deviation, "
                        "e.g. 0.229,0.224,0.225 (defaults as for --mean).")


# --- Latency

OBJECTIVE = typer.Option(None, "--objective", rich_help_panel=LATENCY, show_default=False,
                         help="latency (default): time every candidate on --target, keep a layer dense unless a "
                         "replacement is faster, use each rank's fastest equivalent layout, check the whole model "
                         "and keep it only where it is faster than the original. flops: choose ranks by FLOPs and "
                         "error alone, nothing timed (for hardware you cannot time here).")
TARGET = typer.Option(None, "--target", rich_help_panel=LATENCY, help="Latency target (implies --objective latency): "
                      "cpu (PyTorch eager), cuda (PyTorch eager on the GPU) or onnxruntime (ONNX Runtime CPU). "
                      "Default: cpu for PyTorch models, onnxruntime for ONNX models.")
LATENCY_BUDGET = typer.Option(None, "--latency", "--latency-budget", rich_help_panel=LATENCY, help="Keep this fraction "
                              "of the whole model's time measured on --target, in (0, 1] (implies --objective latency; "
                              "instead of --flops).")
#: the embedded model's demo converts with --max-drop this unless a rank selection is given
EMBEDDED_MAX_DROP = 0.005
MAX_DROP = typer.Option(None, "--max-drop", rich_help_panel=LATENCY, help="The fastest plan on --target whose "
                        "metric on the first half of the evaluation data (--data; the embedded model's own held-out "
                        "set) is within this much of the original's: top-1 accuracy with labels, agreement with the "
                        "original without; the report measures the second half. Latency budgets are bisected (5 "
                        "conversions; timings and calibration statistics measured once); the tries are in the "
                        f"report. Instead of --flops/--latency. The embedded model: {EMBEDDED_MAX_DROP} by default.")
TARGET_BATCH = typer.Option(None, "--batch-size", rich_help_panel=LATENCY, help="Batch size the latency target "
                            "times at (default: the example input's; also spelled --target-batch-size). The "
                            "fine-tuning batch is --finetune-batch-size.")
# the longer spelling, out of the help: both names in one row would not fit an 80-column terminal
TARGET_BATCH_ALIAS = typer.Option(None, "--target-batch-size", hidden=True)
DTYPE = typer.Option(TARGET_DEFAULTS.dtype, "--dtype", rich_help_panel=LATENCY, help="Latency target dtype: float32, "
                     "bfloat16 or float16 (cuda).")
CHANNELS_LAST = typer.Option(None, "--channels-last", rich_help_panel=LATENCY, show_default=False,
                             help="Run the converted model channels-last (its 4-D weights stored so) and time it so: "
                             "the default on --target cpu.")
CONTIGUOUS = typer.Option(False, "--contiguous", rich_help_panel=LATENCY, help="Run and time the converted model "
                          "contiguous (NCHW): the default on --target cuda.")
MARGIN = typer.Option(LATENCY_DEFAULTS.margin, "--margin", rich_help_panel=LATENCY, help="A replacement must be "
                      "measured at least this fraction faster than the dense conv to be used.")
LATENCY_CACHE = typer.Option(None, "--latency-cache", rich_help_panel=LATENCY, help="File of cached layer timings "
                             "(default: latency.json in $SEPARIFY_CACHE_DIR, else in ~/.cache/separify).")
NO_LATENCY_CACHE = typer.Option(False, "--no-latency-cache", rich_help_panel=LATENCY,
                                help="Time every candidate afresh; keep no cache.")


def threads(panel: str = LATENCY):
    return typer.Option(None, "--threads", rich_help_panel=panel, help="CPU threads for timing (PyTorch and ONNX "
                        "Runtime; default: all).")


def batch_size(panel: str = LATENCY, help: str = "Batch size for timing and FLOPs (default: the example input's)."):
    return typer.Option(None, "--batch-size", rich_help_panel=panel, help=help)


# --- The model's outputs: calibration, fine-tuning and the report read them alike

CLASS_AXIS_DEFAULT = ("default: the last axis of outputs of up to 3 dims, (N, C) or (B, T, C) sequence logits; 1 for "
                      "(N, C, H, W)")
CLASS_DIM_HELP = ("The class axis of the model's output logits, for every step that reads them: --calib-loss fisher, "
                  f"--finetune's distillation and the report's agreement ({CLASS_AXIS_DEFAULT}).")


def class_dim(panel: str = WHAT, help: str = CLASS_DIM_HELP):
    return typer.Option(None, "--class-dim", rich_help_panel=panel, help=help, show_default=False)


CLASS_DIM_ALIAS = typer.Option(None, "--calib-class-dim", hidden=True)  # its name before it served every step
CTC_HELP = ("The model outputs CTC logits (B, T, C) with this blank class (a text or speech recogniser). --finetune "
            "trains on the CTC loss of the labels (targets (N, S) padded with the blank, the file's 'labels' entry) "
            "or, for data without labels, of the original's greedy decodings; the report and --max-drop score the "
            "sequence accuracy on --data's labels.")


def ctc_blank(panel: str = WHAT, help: str = CTC_HELP):
    return typer.Option(None, "--ctc-blank", rich_help_panel=panel, help=help, show_default=False)


# --- Fine-tuning

FINETUNE_DATA = typer.Option(None, "--finetune", rich_help_panel=FINETUNE, help="Fine-tune the converted model by "
                             "distillation from the original on these inputs: a tensor file (.npy/.npz/.pt; labels "
                             "used when the .npz/.pt has a 'labels' entry) or a folder of images (labels used when it "
                             "has one subfolder per class, numbered in sorted name order).")
EPOCHS = typer.Option(None, "--epochs", rich_help_panel=FINETUNE,
                      help=f"Fine-tuning epochs (default {FINETUNE_EPOCHS} with --finetune).")
STEPS = typer.Option(None, "--steps", rich_help_panel=FINETUNE, help="Fine-tuning steps, instead of --epochs.")
LR = typer.Option(FINETUNE_LR, "--lr", rich_help_panel=FINETUNE, show_default=False,
                  help="Fine-tuning learning rate (AdamW, linear warm-up, cosine decay). Default: chosen by a short "
                  "learning-rate range test on the fine-tuning data.")
TEMPERATURE = typer.Option(FINETUNE_TEMPERATURE, "--temperature", rich_help_panel=FINETUNE, show_default=False,
                           help="Fine-tuning distillation temperature. Default: the highest of 4, 2, 1 at which the "
                           "original model's softened outputs still give their top class 90% of the probability.")
FINETUNE_BATCH_SIZE = typer.Option(FINETUNE_BATCH, "--finetune-batch-size", rich_help_panel=FINETUNE,
                                   help="Fine-tuning batch size.")
CHECKPOINT = typer.Option(None, "--checkpoint", rich_help_panel=FINETUNE, help="Fine-tuning checkpoint file: saved "
                          "periodically, resumed from if it exists.")


# --- Report and output

def data(panel: str = REPORT):
    return typer.Option(None, "--data", rich_help_panel=panel, help="Evaluation data for the report: a tensor file "
                        "(.npy/.npz/.pt; top-1/top-5 accuracy when it has 'labels') or a folder of images (labels from "
                        "class subfolders). Without it: agreement with the original on random inputs (the embedded "
                        "model: its held-out test images).")


def data_limit(panel: str = REPORT):
    return typer.Option(DATA_LIMIT, "--data-limit", rich_help_panel=panel,
                        help="Evaluate on at most this many samples of --data.")


def json_out(panel: str = REPORT):
    return typer.Option(None, "--json", rich_help_panel=panel, help="Also write the report as JSON (versioned schema, "
                        "every figure with its unit).")


def html_out(panel: str = REPORT):
    return typer.Option(None, "--html", rich_help_panel=panel, help="Also write the report as one self-contained HTML "
                        "page with plots.")


def png_out(panel: str = REPORT):
    return typer.Option(None, "--png", rich_help_panel=panel, help="Also write the report's plots as one PNG.")


def timing(panel: str = REPORT):
    return typer.Option(True, "--timing/--no-timing", rich_help_panel=panel, help="Time the whole models.")


def onnx(panel: str = REPORT):
    return typer.Option(True, "--onnx/--no-onnx", rich_help_panel=panel, help="Also export both models to ONNX and "
                        "time them in ONNX Runtime.")


def layers(panel: str = REPORT):
    return typer.Option(True, "--layers/--no-layers", rich_help_panel=panel, help="Time every original conv and its "
                        "replacement.")


def min_time(panel: str = REPORT):
    return typer.Option(MIN_TIME, "--min-time", rich_help_panel=panel, help="Seconds of timed runs per model (after "
                        "warm-up); per layer a tenth.")


def force(panel: str = REPORT):
    return typer.Option(False, "--force", rich_help_panel=panel, help="Replace output files that exist.")


REPORT_BATCH_SIZE = typer.Option(None, "--report-batch-size", rich_help_panel=REPORT, help="Batch size for the "
                                 "report's timings and FLOPs (default: the example input's).")
