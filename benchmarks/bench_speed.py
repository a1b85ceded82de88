"""Faster, not just fewer FLOPs: what ``separify.convert`` buys in time, per model, target and setting.

Run from the repository root (``pip install -e '.[bench]'`` first; the OCR model needs
``pip install --no-deps ddddocr==1.6.1`` and Debian's ``fonts-dejavu-core``, the embedded model's calibration data
Debian's ``dataset-fashion-mnist``)::

    python benchmarks/bench_speed.py [--models embedded,resnet18,resnet50,ocr] [--targets cpu,onnxruntime]
                                     [--settings default,latency0.5,latency0.3,maxdrop0.01] [--run-time 5]
                                     [--out benchmarks/results/speed.md]

    python benchmarks/bench_speed.py --models embedded --run-time 0.2 --eval-limit 200 --out /tmp/speed.md  # smoke

Models:

* ``embedded``: separify's trained Fashion-MNIST ResNet (input 1×1×28×28). Metric: top-1 accuracy on the shipped
  held-out test images (``load_eval_data``). Calibration: the first 1,000 images of the Fashion-MNIST *training*
  split (Debian's ``dataset-fashion-mnist``), as ``benchmarks/bench_accuracy.py`` and
  ``examples/convert_finetune_script.py`` do (``separify.io.embedded.load_calibration_data()`` is used instead if
  the package provides it); never the held-out eval images.
* ``resnet18``, ``resnet50``: torchvision with random weights (seed 0), input 1×3×224×224. No data: no metric, no
  calibration, no ``max_drop`` setting.
* ``ocr``: ddddocr's ``common.onnx`` (``benchmarks/second_model.py``) converted *as the ONNX file* by
  ``separify.convert_onnx`` at 1×1×64×192; its target is always ONNX Runtime (the torch-CPU row says n/a). Metric:
  word accuracy on the 500 rendered strings, both graphs run by onnxruntime. Calibration: 256 rendered images
  with other strings.

Targets: ``cpu`` = PyTorch eager on the CPU, ``onnxruntime`` = ONNX Runtime's CPU execution provider; always
``LatencyTarget(backend, threads=2, batch_size=1)`` and ``torch.set_num_threads(2)``.

Settings: ``default`` (the library's defaults, i.e. ``objective="latency"``), ``latencyX`` (``latency=X``, a budget
as a fraction of the original's time; ``latency0.3`` only for resnet18 unless ``--settings`` is given),
``maxdropX`` (``max_drop=X`` with ``evaluate=`` the metric; models with data only). A setting the library does not
support yet fails its row with a clear message; every row is guarded (the sweep goes on after an error).

Per model × target the latency cache (``SEPARIFY_CACHE_DIR``) is a fresh temporary folder, so the first conversion
times every candidate (cold); ``default`` is run first and then once more with the cache warm, and both wall times
are reported. Later settings reuse that cache (their time is marked warm).

Columns: FLOPs converted / original; the conversion's own whole-model check (``result.latency_ratio``); an
independent re-time of original and converted, interleaved in this process for ``--run-time`` s each
(torch target: ``separify.planning.latency.time_model``, the original at the faster of its contiguous and
channels-last readings as the conversion's check takes it; onnxruntime target: both models as ONNX files —
exported by ``separify.core.measure.export_onnx``, or the converted OCR graph saved — timed by
``separify.core.measure.time_onnxruntime``) as the ratio of medians ± its quartile spread
(``r·√((½IQR₁/m₁)² + (½IQR₂/m₂)²)``, ``*``: a noisy timing); that ratio / the FLOPs ratio (above 1: time fell
less than FLOPs); the metric before → after; conversion wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import inspect
import math
import os
import shlex
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402

import separify  # noqa: E402
from separify.core import measure  # noqa: E402

THREADS = 2
BATCH = 1
MODELS = ("embedded", "resnet18", "resnet50", "ocr")
TARGETS = ("cpu", "onnxruntime")
SETTINGS = ("default", "latency0.5", "latency0.3", "maxdrop0.01")
FASHION = Path("/usr/share/datasets/fashion-mnist")
EMBEDDED_CALIB = 1000
OCR_CALIB = 256
OCR_EVAL = 500
OCR_NA = "n/a: ONNX input is timed in ONNX Runtime"


class Unsupported(RuntimeError):
    """The library in this checkout lacks what a setting needs."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------- models


@dataclass
class Subject:
    name: str
    kind: str  # "torch" or "onnx"
    example: torch.Tensor
    model: Any = None  # nn.Module (torch) or the ONNX file's path (onnx)
    calibration: torch.Tensor | None = None
    calib_note: str = "none"
    metric_name: str | None = None
    evaluate: Callable[[Any], float] | None = None  # torch: (nn.Module) -> float; onnx: (runner) -> float
    metric_cache: dict = field(default_factory=dict)

    @property
    def has_data(self) -> bool:
        return self.evaluate is not None


def _fashion_train(n: int) -> torch.Tensor:
    from separify.io.embedded import normalize

    path = FASHION / "train-images-idx3-ubyte.gz"
    if not path.exists():
        raise RuntimeError(f"no calibration data for the embedded model: {path} is missing "
                           "(apt-get install dataset-fashion-mnist)")
    with gzip.open(path) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    return normalize(images)


def _embedded_calibration(limit: int) -> tuple[torch.Tensor, str]:
    from separify.io import embedded

    loader = getattr(embedded, "load_calibration_data", None)
    if callable(loader):
        x = loader()
        x = x[0] if isinstance(x, (tuple, list)) else x
        return x[:limit], f"separify.io.embedded.load_calibration_data() ({len(x[:limit])} images)"
    return _fashion_train(limit), f"the first {limit:,} Fashion-MNIST training images"


def load_subject(name: str, eval_limit: int | None, calib_limit: int | None) -> Subject:
    if name == "embedded":
        from separify.io import embedded

        try:
            model = embedded.load_default_model()
        except RuntimeError as exc:  # e.g. the shipped weights are being retrained at another width
            raise RuntimeError(f"the embedded model does not load ({_first_line(exc)[:200]}); the shipped weights "
                               "do not match FashionResNet in this checkout") from None
        images, labels = embedded.load_eval_data(eval_limit)
        calib, note = _embedded_calibration(calib_limit or EMBEDDED_CALIB)
        return Subject(name, "torch", images[:1].clone(), model, calib, note,
                       f"top-1 accuracy ({len(images)} held-out test images)",
                       lambda m: measure.accuracy(m, images, labels))
    if name in ("resnet18", "resnet50"):
        import torchvision

        torch.manual_seed(0)
        model = getattr(torchvision.models, name)().eval()
        x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        return Subject(name, "torch", x, model)
    if name == "ocr":
        import second_model as sm

        path = sm._ddddocr_dir() / "common.onnx"
        n = min(eval_limit or OCR_EVAL, OCR_EVAL)
        images, labels = sm.eval_set(n)
        calib = sm.calibration_inputs(calib_limit or OCR_CALIB)
        return Subject(name, "onnx", sm.example_input(), path, calib, f"{len(calib)} rendered images",
                       f"word accuracy ({n} rendered strings, onnxruntime)",
                       lambda runner: _ocr_accuracy(runner, images, labels))
    raise ValueError(f"unknown model {name!r}")


def _ocr_accuracy(runner: Any, images: torch.Tensor, labels) -> float:
    """Word accuracy of an ONNX runner: an ``OrtModule``-like callable (tensor in, tensor out) or an onnxruntime
    ``InferenceSession``. The graph's batch is 1 and its output (T, 1, classes)."""
    import second_model as sm

    if callable(runner):
        run = runner
    elif hasattr(runner, "run") and hasattr(runner, "get_inputs"):
        name = runner.get_inputs()[0].name
        run = lambda x: runner.run(None, {name: x.numpy()})[0]  # noqa: E731
    else:
        raise TypeError(f"cannot run the OCR metric on a {type(runner).__name__}")
    hits = 0
    with torch.no_grad():
        for i in range(len(images)):
            out = run(images[i:i + 1])
            out = out[0] if isinstance(out, (tuple, list)) else out
            out = out if isinstance(out, torch.Tensor) else torch.from_numpy(np.asarray(out))
            if out.dim() == 3 and out.shape[1] == 1 and out.shape[0] != 1:  # (T, 1, C) → (1, T, C)
                out = out.transpose(0, 1)
            hits += sm.decode(out)[0] == labels[i]
    return hits / len(images)


def _ort_runner(model: Any):
    from separify.backends.onnx import OrtModule, load_onnx

    return OrtModule(load_onnx(model) if isinstance(model, (str, os.PathLike)) else model, threads=THREADS)


def metric_of(subject: Subject, model: Any) -> float:
    if subject.kind == "onnx":
        return subject.evaluate(_ort_runner(model))
    return subject.evaluate(model)


def metric_before(subject: Subject) -> float:
    if "before" not in subject.metric_cache:
        subject.metric_cache["before"] = metric_of(subject, subject.model)
    return subject.metric_cache["before"]


# --------------------------------------------------------------------------------------------------- the API


def setting_options(setting: str) -> dict[str, Any]:
    if setting == "default":
        return {}
    for prefix, key in (("latency", "latency"), ("maxdrop", "max_drop")):
        if setting.startswith(prefix):
            try:
                return {key: float(setting[len(prefix):])}
            except ValueError:
                break
    raise ValueError(f"unknown setting {setting!r} (default, latencyX, maxdropX)")


def _accepts(fn: Callable, keyword: str) -> bool:
    """Whether ``fn`` (``separify.convert`` / ``convert_onnx``) takes ``keyword``: a parameter of its own, or a
    config field it forwards through ``**options``."""
    from separify.config import FLAT, ConvertConfig

    if keyword in inspect.signature(fn).parameters:
        return True
    return keyword in FLAT or keyword in inspect.signature(ConvertConfig.__init__).parameters


def check_api(subject: Subject, opts: dict[str, Any]) -> None:
    """Refuse, with a clear message, what this checkout of separify cannot do yet (no guessing)."""
    fn = separify.convert_onnx if subject.kind == "onnx" else separify.convert
    missing = [k for k in ("max_drop", "evaluate") if "max_drop" in opts and not _accepts(fn, k)]
    if missing:
        raise Unsupported(f"separify.{fn.__name__} takes no {', '.join(k + '=' for k in missing)} keyword in this "
                          "checkout (the max_drop search is not in yet)")
    if not opts:
        objective = separify.ConvertConfig().objective
        if objective != "latency":
            raise Unsupported(f"the library's default objective is {objective!r}, not 'latency', in this checkout "
                              "(the new default is not in yet), so the default setting is not what it should measure")


def latency_target(backend: str):
    return separify.LatencyTarget(backend, threads=THREADS, batch_size=BATCH)


def convert(subject: Subject, backend: str, setting: str):
    opts = setting_options(setting)
    check_api(subject, opts)
    if "max_drop" in opts:
        opts["evaluate"] = subject.evaluate
    common = dict(calibration=subject.calibration, progress=False, **opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kept in result.warnings, printed by the caller
        if subject.kind == "onnx":
            return separify.convert_onnx(str(subject.model), input_shapes=tuple(subject.example.shape),
                                         threads=THREADS, **common)
        return separify.convert(subject.model, example_inputs=subject.example, target=latency_target(backend),
                                **common)


# --------------------------------------------------------------------------------------------------- timing


def retime(subject: Subject, backend: str, result, tmp: Path, tag: str, run_time: float, exports: dict):
    """Original and converted, interleaved in one run on the target: (timing original, timing converted)."""
    x = subject.example
    if backend == "cpu":
        from separify.planning.latency import time_model

        a, b = time_model([subject.model, result.model], (x,), latency_target("cpu"), run_time=run_time,
                          either_format=[True, False])
        return a, b
    if subject.kind == "onnx":
        original = Path(subject.model)
        converted = tmp / f"{tag}.onnx"
        result.save(converted)
    else:
        if "original" not in exports:
            exports["original"] = tmp / "original.onnx"
            measure.export_onnx(subject.model, (x,), exports["original"])
        original = exports["original"]
        converted = tmp / f"{tag}.onnx"
        measure.export_onnx(result.model, (x,), converted)
    a, b = measure.time_onnxruntime([str(original), str(converted)], [x], threads=THREADS, min_run_time=run_time)
    return a, b


def ratio_text(a, b) -> str:
    r = b.median_ms / a.median_ms
    pm = r * math.sqrt((a.iqr_ms / 2 / a.median_ms) ** 2 + (b.iqr_ms / 2 / b.median_ms) ** 2)
    return f"{r:.2f} ± {pm:.2f}" + ("*" if a.noisy or b.noisy else "")


# --------------------------------------------------------------------------------------------------- rows

HEADER = ["| model | target | setting | converted | FLOPs ratio | check ratio | re-timed ratio | ms orig → conv "
          "| time / FLOPs | metric before → after | convert s | notes |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]


@dataclass
class Row:
    model: str
    target: str
    setting: str
    cells: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def line(self, ref: int | None) -> str:
        c = self.cells
        status = " ".join(t for t in (c.get("status", ""), f"[{ref}]" if ref is not None else "") if t)
        return (f"| {self.model} | {self.target} | {self.setting} | {c.get('converted', '')} | {c.get('flops', '')} "
                f"| {c.get('check', '')} | {c.get('retimed', '')} | {c.get('ms', '')} | {c.get('per_flops', '')} "
                f"| {c.get('metric', '')} | {c.get('seconds', '')} | {status} |")


def _cache_warm(cache_dir: Path) -> bool:
    return (cache_dir / "latency.json").exists()


def timed_convert(subject: Subject, backend: str, setting: str, cache_dir: Path):
    warm = _cache_warm(cache_dir)
    t0 = time.perf_counter()
    try:
        result = convert(subject, backend, setting)
    finally:
        seconds = time.perf_counter() - t0
    return result, seconds, warm


def run_row(row: Row, subject: Subject, backend: str, cache_dir: Path, tmp: Path, args, exports: dict) -> None:
    tag = f"{row.model}/{row.target}/{row.setting}"
    say(f"{tag}: converting ({'warm' if _cache_warm(cache_dir) else 'cold'} cache) ...")
    result, seconds, warm = timed_convert(subject, backend, row.setting, cache_dir)
    times = [f"{'warm' if warm else 'cold'} {seconds:.1f}"]
    say(f"{tag}: converted in {seconds:.1f} s; FLOPs ratio {result.flops_ratio:.3f}, check ratio "
        f"{_fmt(result.latency_ratio)}, {len(result.converted)}/{len(result.layers)} layers converted")
    for w in result.warnings:
        say(f"{tag}: warning: {w}")
        row.notes.append(f"warning: {w}")
    c = row.cells
    c["converted"] = f"{len(result.converted)}/{len(result.layers)}"
    c["flops"] = f"{result.flops_ratio:.3f}"
    c["check"] = _fmt(result.latency_ratio)
    if result.latency_ratio is not None and result.latency_before is not None:
        row.notes.append(f"conversion's check on {result.latency_target}: {result.latency_before.median_ms:.2f} → "
                         f"{result.latency_after.median_ms:.2f} ms (IQR {result.latency_before.iqr_ms:.2f} / "
                         f"{result.latency_after.iqr_ms:.2f})")
    if getattr(result, "seconds", None) is not None:
        row.notes.append(f"result.seconds {result.seconds:.1f}")
    _search_notes(row, result)
    c["seconds"] = times[0]
    if row.setting == "default":  # the same conversion once more, the cache now warm
        say(f"{tag}: converting again ({'warm' if _cache_warm(cache_dir) else 'cold'} cache) ...")
        try:
            again, seconds2, warm2 = timed_convert(subject, backend, row.setting, cache_dir)
            times.append(f"{'warm' if warm2 else 'cold'} {seconds2:.1f}")
            say(f"{tag}: second conversion {seconds2:.1f} s; FLOPs ratio {again.flops_ratio:.3f}, check ratio "
                f"{_fmt(again.latency_ratio)}")
            if abs(again.flops_ratio - result.flops_ratio) > 1e-9:
                row.notes.append(f"second (warm) run chose another plan: FLOPs ratio {again.flops_ratio:.3f}, check "
                                 f"ratio {_fmt(again.latency_ratio)}")
        except Exception as exc:  # noqa: BLE001 - keep the first run's row
            times.append(f"warm run failed: {_first_line(exc)}")
            row.notes.append(f"second run: {_first_line(exc)}")
        c["seconds"] = " / ".join(times)
    say(f"{tag}: re-timing original vs converted ({args.run_time:g} s each) ...")
    a, b = retime(subject, backend, result, tmp, row.setting, args.run_time, exports)
    c["retimed"] = ratio_text(a, b)
    c["ms"] = f"{a.median_ms:.2f} → {b.median_ms:.2f}"
    c["per_flops"] = f"{(b.median_ms / a.median_ms) / result.flops_ratio:.2f}" if result.flops_ratio > 0 else ""
    say(f"{tag}: re-timed {a.median_ms:.2f} → {b.median_ms:.2f} ms, ratio {c['retimed']}")
    if subject.has_data:
        say(f"{tag}: evaluating ...")
        before = metric_before(subject)
        after = metric_of(subject, result.model)
        c["metric"] = f"{before:.3f} → {after:.3f}"
        say(f"{tag}: {subject.metric_name}: {c['metric']}")
    c["status"] = "ok"


def _search_notes(row: Row, result) -> None:
    search = getattr(result, "search", None)
    if search is None:
        return
    tries = "; ".join(f"budget {t.budget:g}: FLOPs {t.flops_ratio:.3f}, time {_fmt(t.time_ratio)}, metric "
                      f"{t.metric:.3f}{'' if t.within else ' (too low)'}{' ← chosen' if t.chosen else ''}"
                      for t in search.tries)
    row.notes.append(f"max_drop search ({len(search.tries)} tries, original {search.original:.3f}): {tries}")


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def sweep_model(name: str, targets, settings, args, rows: list[Row], about: list[str]) -> None:
    say(f"{name}: loading ...")
    try:
        subject = load_subject(name, args.eval_limit, args.calib_limit)
    except Exception as exc:  # noqa: BLE001 - one failing model must not stop the sweep
        traceback.print_exc()
        rows.append(Row(name, "—", "—", {"status": f"error loading the model: {_first_line(exc)[:300]}"}))
        say(f"{name}: {rows[-1].cells['status']}")
        return
    about.append(f"- {name}: input {tuple(subject.example.shape)}; calibration: {subject.calib_note}; metric: "
                 f"{subject.metric_name or 'none (no data)'}"
                 + ("; metric of torch models measured in PyTorch on both targets" if subject.kind == "torch"
                    and subject.has_data else ""))
    say(f"{name}: calibration: {subject.calib_note}; metric: {subject.metric_name or 'none (no data)'}")
    for backend in targets:
        if subject.kind == "onnx" and backend == "cpu":
            rows.append(Row(name, backend, "—", {"status": OCR_NA}))
            say(f"{name}/{backend}: {OCR_NA}")
            continue
        chosen = [s for s in settings if _applies(name, s, subject, args.settings_given)]
        chosen.sort(key=lambda s: s != "default")  # default first: its first run is the cold one
        with tempfile.TemporaryDirectory(prefix=f"bench-speed-{name}-{backend}-") as tmpdir:
            tmp = Path(tmpdir)
            cache_dir = tmp / "cache"
            cache_dir.mkdir()
            old = os.environ.get("SEPARIFY_CACHE_DIR")
            os.environ["SEPARIFY_CACHE_DIR"] = str(cache_dir)
            exports: dict = {}
            try:
                for setting in chosen:
                    row = Row(name, backend, setting)
                    rows.append(row)
                    try:
                        run_row(row, subject, backend, cache_dir, tmp, args, exports)
                    except Unsupported as exc:
                        row.cells["status"] = f"unsupported: {exc}"
                        say(f"{name}/{backend}/{setting}: unsupported: {exc}")
                    except Exception as exc:  # noqa: BLE001 - the row says what went wrong; the sweep goes on
                        traceback.print_exc()
                        row.cells["status"] = f"error: {_first_line(exc)[:300]}"
                        say(f"{name}/{backend}/{setting}: {row.cells['status']}")
            finally:
                if old is None:
                    os.environ.pop("SEPARIFY_CACHE_DIR", None)
                else:
                    os.environ["SEPARIFY_CACHE_DIR"] = old


def _applies(name: str, setting: str, subject: Subject, given: bool) -> bool:
    if setting.startswith("maxdrop") and not subject.has_data:
        return False
    if setting == "latency0.3" and not given:
        return name == "resnet18"
    return True


# --------------------------------------------------------------------------------------------------- main


def load_warning() -> str | None:
    """A warning when other work shares the CPUs: with 2 intra-op threads on a busy 2-core machine, PyTorch's
    thread pool waits for a descheduled peer at every op (the embedded model measured 1.4 ms with 1 thread and
    130-220 ms with 2 while a training job ran), so timings then say nothing about the machine."""
    if not hasattr(os, "getloadavg"):
        return None
    load = os.getloadavg()[0]
    spare = max((os.cpu_count() or 1) - THREADS, 0)
    if load <= spare + 0.75:
        return None
    return (f"Warning: load average {load:.2f} on {os.cpu_count()} logical CPUs before this run: other work shares "
            f"the cores, and with {THREADS} intra-op threads a busy machine can make PyTorch many times slower "
            "(threads wait for descheduled peers); these timings are not the idle machine's.")


def machine_lines(args) -> list[str]:
    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except ImportError:
        ort = "not installed"
    load = args.load_at_start
    return [f"Machine: {measure.cpu_name()}, {os.cpu_count()} logical CPUs (load average at start {load}); "
            f"torch {torch.__version__}, onnxruntime {ort}, separify {separify.__version__}; {THREADS} threads "
            f"(torch.set_num_threads and the latency targets), batch {BATCH}. "
            f"Started {args.started_at:%Y-%m-%d %H:%M} UTC."] + ([args.load_warning] if args.load_warning else [])


def table(rows: list[Row], args, command: str, started: float, subjects_note: list[str]) -> list[str]:
    lines = ["# Faster, not just fewer FLOPs: conversion speed", "", f"Command: `{command}`", "",
             *machine_lines(args), "",
             f"Re-timing: {args.run_time:g} s of timed calls per model, interleaved. Ratios are converted / original "
             "(below 1: faster). \"check ratio\": the conversion's own whole-model measurement "
             "(`result.latency_ratio`); \"re-timed ratio\": measured again here, ± quartile spread, * noisy; "
             "\"time / FLOPs\": re-timed ratio / FLOPs ratio. \"convert s\": wall time of `convert`, with a cold "
             "(fresh) or warm latency cache.", ""]
    if subjects_note:
        lines += ["Models:", "", *subjects_note, ""]
    lines += HEADER
    notes: list[str] = []
    for row in rows:
        ref = None
        if row.notes:
            notes.append(f"{len(notes) + 1}. {row.model}/{row.target}/{row.setting}: " + " — ".join(row.notes))
            ref = len(notes)
        lines.append(row.line(ref))
    if notes:
        lines += ["", "Notes:", "", *notes]
    end_load = " / ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    lines += ["", f"Total wall time {time.perf_counter() - started:.0f} s; load average at the end {end_load}."]
    return lines


def _names(text: str | None, allowed, what: str, free: bool = False) -> list[str]:
    if text is None:
        return list(allowed)
    names = [t.strip() for t in text.split(",") if t.strip()]
    for n in names:
        if free:
            setting_options(n)
        elif n not in allowed:
            raise SystemExit(f"unknown {what} {n!r}; choose from {', '.join(allowed)}")
    return names


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help=f"comma-separated, from {','.join(MODELS)} (default: all)")
    ap.add_argument("--targets", help=f"comma-separated, from {','.join(TARGETS)} (default: all)")
    ap.add_argument("--settings", help="comma-separated: default, latencyX, maxdropX (default: default, latency0.5, "
                                       "latency0.3 for resnet18, maxdrop0.01 for models with data)")
    ap.add_argument("--run-time", type=float, default=5.0, help="seconds of timed calls per model when re-timing")
    ap.add_argument("--eval-limit", type=int, default=None, help="evaluate on only the first N images (smoke runs)")
    ap.add_argument("--calib-limit", type=int, default=None,
                    help=f"calibration samples (default {EMBEDDED_CALIB} embedded, {OCR_CALIB} ocr)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/speed.md"))
    args = ap.parse_args(argv)
    models = _names(args.models, MODELS, "model")
    targets = _names(args.targets, TARGETS, "target")
    try:
        settings = _names(args.settings, SETTINGS, "setting", free=True)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    args.settings_given = args.settings is not None
    if args.run_time <= 0:
        raise SystemExit("--run-time must be positive")

    args.load_at_start = " / ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    args.load_warning = load_warning()
    args.started_at = datetime.now(timezone.utc)
    torch.set_num_threads(THREADS)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    say(f"{command}  ({measure.cpu_name()}, {THREADS} threads)")
    if args.load_warning:
        say(args.load_warning)
    started = time.perf_counter()
    rows: list[Row] = []
    notes: list[str] = []
    try:
        for name in models:
            sweep_model(name, targets, settings, args, rows, notes)
    except KeyboardInterrupt:
        say("interrupted: writing the rows done so far")
        rows.append(Row("—", "—", "—", {"status": "sweep interrupted here"}))
    finally:
        write_result(args.out, table(rows, args, command, started, notes))
        say(f"wrote {args.out}")


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
