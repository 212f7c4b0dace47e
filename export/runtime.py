"""ONNX Runtime sessions with the gspn custom-operator library registered."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnxruntime as ort


def library_path() -> Path:
    """Path of the custom-operator library ``libgspn_ortops.so`` inside the package.

    An installed wheel carries it and this only finds it. In a source checkout (the C++ sources
    beside the package), the development path: it is (re)built in place when missing or when its
    sources changed, as ``python -m export.build`` does. Raises ``export.build.BuildError`` saying
    what is missing and how to get it.
    """
    from . import build

    if build.have_sources():
        return build.build_library()
    library = build.built_library_path()
    if not library.is_file():
        raise build.BuildError(
            f"{library} is missing: this installation of the package has neither the ONNX Runtime "
            "custom-operator library nor its sources. Reinstall the wheel, or install from a source "
            "checkout (`make setup`, or `python -m export.build` there)."
        )
    return library


def session(
    path: str | os.PathLike | bytes | onnx.ModelProto,
    providers: list | None = None,
    **options,
) -> ort.InferenceSession:
    """An ``onnxruntime.InferenceSession`` for ``path`` with the gspn library registered.

    ``path`` is a model file, its serialized bytes or a ModelProto. ``options`` set attributes of
    ``onnxruntime.SessionOptions`` (e.g. ``intra_op_num_threads=2``). ``providers`` defaults to
    the CPU execution provider, the one the library implements.
    """
    session_options = ort.SessionOptions()
    for name, value in options.items():
        if not hasattr(session_options, name):
            raise TypeError(f"session(): {name!r} is not an onnxruntime.SessionOptions attribute")
        setattr(session_options, name, value)
    session_options.register_custom_ops_library(str(library_path()))
    if isinstance(path, onnx.ModelProto):
        model: str | bytes = path.SerializeToString()
    elif isinstance(path, bytes):
        model = path
    else:
        model = os.fspath(path)
    return ort.InferenceSession(
        model, sess_options=session_options, providers=providers or ["CPUExecutionProvider"]
    )
