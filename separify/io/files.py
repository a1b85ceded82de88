"""File utilities of the I/O layer: input checks, format sniffing, output-path checks and atomic writes.

Formats are told apart by content, not by extension (:func:`sniff_format`): a zip archive holding
``archive_format`` is a ``torch.export`` program, one holding ``data.pkl`` a ``torch.save`` file; a first byte
``0x80`` is a legacy (pickle) ``torch.save`` file; a first byte ``0x08`` (field 1 of an ONNX ``ModelProto``) or the
``.onnx`` extension an ONNX model. Writes go to a temporary file in the target folder that is renamed into place.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from separify.errors import ModelLoadError, SeparifyError

__all__ = ["OUTPUT_SUFFIXES", "atomic_write", "check_input_file", "check_output_path", "few_names", "is_onnx",
           "sniff_format"]

OUTPUT_SUFFIXES = (".pt2", ".pt", ".pth", ".onnx")


def few_names(keys: list[str]) -> str:
    """The first three of ``keys`` for a message, ``"a, b, c and 4 more"``."""
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def check_input_file(path: Path) -> None:
    """Raise :class:`ModelLoadError` unless ``path`` is an existing, readable, non-empty file."""
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, expected a model file")
    if not os.access(path, os.R_OK):
        raise ModelLoadError(f"{path}: not readable")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: empty file")


def sniff_format(path: Path) -> str:
    """``"pt2"``, ``"torch-zip"``, ``"torch-legacy"``, ``"onnx"`` or ``"unknown"`` (see the module docstring);
    :class:`ModelLoadError` for a corrupt zip archive."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise ModelLoadError(f"{path}: corrupt or truncated archive ({exc})") from None
        if any(n.endswith("/archive_format") or n == "archive_format" for n in names):
            return "pt2"
        if any(n.endswith("data.pkl") for n in names):
            return "torch-zip"
        return "unknown"
    if head[:1] == b"\x80":
        return "torch-legacy"
    if path.suffix.lower() == ".onnx" or head[:1] == b"\x08":  # ModelProto starts with field 1 (ir_version)
        return "onnx"
    return "unknown"


def is_onnx(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like an ONNX model (by its first byte or its extension); it is checked when loaded."""
    path = Path(path)
    check_input_file(path)
    return sniff_format(path) == "onnx"


def check_output_path(out: str | os.PathLike, *, inputs: tuple[str | os.PathLike | None, ...] = (),
                      force: bool = False, suffixes: tuple[str, ...] = OUTPUT_SUFFIXES) -> Path:
    """Refuse an output that would overwrite an input, that exists (unless ``force``), whose extension is not one of
    ``suffixes`` (default: the model formats), or whose folder is missing or not writable. Call before any work so
    that no time is wasted."""
    out = Path(out)
    if out.suffix.lower() not in suffixes:
        if suffixes == OUTPUT_SUFFIXES:
            raise SeparifyError(f"output {out}: use a .pt2 (torch.export), .pt/.pth (pickled module) or .onnx file name")
        raise SeparifyError(f"output {out}: the file name must end in {' or '.join(suffixes)}")
    for src in inputs:
        if src is None:
            continue
        src = Path(src)
        same = out.resolve() == src.resolve() or (src.exists() and out.exists() and os.path.samefile(src, out))
        if same:
            raise SeparifyError(f"output {out} is the input file; choose another name (the input is never overwritten)")
    if out.is_dir():
        raise SeparifyError(f"output {out} is a directory")
    if out.exists() and not force:
        raise SeparifyError(f"output {out} exists; pass --force to replace it")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise SeparifyError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SeparifyError(f"output folder {folder} is not writable")
    return out


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it over ``path`` (mode: a new
    file's under the umask). On any failure the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private (0600); give it a normal new file's mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
