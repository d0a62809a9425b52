"""Import TensorFlow once per process: quietly, with GPU memory growth on.

TensorFlow writes CUDA probing noise straight to file descriptor 2 before its logging is set
up; on a CPU-only machine that is several alarming lines per process. They are hidden while
importing and probing devices (Python errors still surface as exceptions). Memory growth lets
several trial processes share one GPU (``--trials-per-gpu``) instead of the first taking it all.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from tuner import render
from tuner.errors import RuntimeFailure

_done = False


def init_tensorflow() -> list[str]:
    """Import TensorFlow, enable memory growth, and return the visible GPU names.

    A Python without a working TensorFlow is a :class:`RuntimeFailure` (one line, not
    restarted), not a crash: a worker child restarted for it would only fail again.
    """
    global _done
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with _stderr_silenced():
        try:
            import tensorflow as tf
        except ImportError as exc:
            raise RuntimeFailure(render.no_tensorflow(str(exc), sys.executable)) from None

        gpus = tf.config.list_physical_devices("GPU")
        if not _done:
            for gpu in gpus:
                tf.config.experimental.set_memory_growth(gpu, True)
    _done = True
    return [gpu.name for gpu in gpus]


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    if os.environ.get("TUNER_DEBUG"):
        yield
        return
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
