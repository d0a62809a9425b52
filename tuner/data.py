"""Data sources → arrays → ``tf.data`` pipelines.

:func:`check_source` is cheap (numpy only) and runs before anything is written to a study, so
a missing or malformed ``npz:`` file is a user error, not a crashed worker. :func:`load_arrays`
is called once per worker process and reused by every trial; :func:`make_datasets` wraps the
arrays in cached, prefetched ``tf.data`` pipelines (numpy inputs make TensorFlow stall at each
epoch start while it tears down the previous iterator).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tuner.errors import RuntimeFailure, UserError
from tuner.spec import DataSpec

if TYPE_CHECKING:
    import tensorflow as tf

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}


@dataclass(frozen=True)
class Arrays:
    """Images scaled to [0, 1] as float32 ``(n, h, w, c)`` and integer labels ``0..k-1``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_val.max())) + 1


def check_source(data: DataSpec) -> None:
    """Fail fast, without TensorFlow, on a data source that cannot load."""
    kind, _, rest = data.source.partition(":")
    if kind == "npz":
        _read_npz(Path(rest), data)
    elif kind == "images":
        _image_files(Path(rest))


def load_arrays(data: DataSpec, seed: int = 0) -> Arrays:
    """Load, scale and split a source; the split is seeded so every worker sees the same one."""
    kind, _, rest = data.source.partition(":")
    if kind == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x, y = digits.images[..., None] / 16.0, digits.target
        arrays = _split(x, y, data.validation_split, seed)
    elif kind == "npz":
        arrays = _read_npz(Path(rest), data, seed)
    elif kind == "images":
        arrays = _read_images(Path(rest), data, seed)
    elif kind == "keras":
        arrays = _read_keras(rest)
    else:  # validated by the spec parser
        raise UserError(f"unknown data source {data.source!r}")
    if data.limit is not None:
        n_val = max(1, round(data.limit * len(arrays.x_val)
                             / (len(arrays.x_train) + len(arrays.x_val))))
        arrays = Arrays(arrays.x_train[: data.limit - n_val], arrays.y_train[: data.limit - n_val],
                        arrays.x_val[:n_val], arrays.y_val[:n_val])
    return arrays


def make_datasets(arrays: Arrays, batch_size: int, seed: int = 0
                  ) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    """Cached, shuffled (train only), batched and prefetched pipelines."""
    import tensorflow as tf

    def pipeline(x: np.ndarray, y: np.ndarray, shuffle: bool) -> tf.data.Dataset:
        ds = tf.data.Dataset.from_tensor_slices((x, y)).cache()
        if shuffle:
            ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    return (pipeline(arrays.x_train, arrays.y_train, True),
            pipeline(arrays.x_val, arrays.y_val, False))


def _split(x: np.ndarray, y: np.ndarray, validation_split: float, seed: int) -> Arrays:
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = max(1, int(round(len(x) * validation_split)))
    val, train = order[:n_val], order[n_val:]
    return _as_arrays(x[train], y[train], x[val], y[val])


def _as_arrays(x_train, y_train, x_val, y_val) -> Arrays:  # noqa: ANN001
    def images(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 3:
            x = x[..., None]
        if x.size and x.max() > 1.0:
            x = x / 255.0
        return x

    def labels(y: np.ndarray) -> np.ndarray:
        return np.asarray(y).reshape(-1).astype(np.int64)

    return Arrays(images(x_train), labels(y_train), images(x_val), labels(y_val))


def _read_npz(path: Path, data: DataSpec, seed: int = 0) -> Arrays:
    where = f"[data] source npz:{path}"
    if not path.is_file():
        raise UserError(f"{where}: file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            if {"x_train", "y_train", "x_val", "y_val"} <= keys:
                parts = [_npz_array(npz, k, where) for k in ("x_train", "y_train", "x_val",
                                                             "y_val")]
                for x_key, y_key, x, y in (("x_train", "y_train", parts[0], parts[1]),
                                           ("x_val", "y_val", parts[2], parts[3])):
                    _check_pair(where, x_key, y_key, x, y)
                return _as_arrays(*parts)
            if {"x", "y"} <= keys:
                x, y = _npz_array(npz, "x", where), _npz_array(npz, "y", where)
                _check_pair(where, "x", "y", x, y)
                return _split(x, y, data.validation_split, seed)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"{where}: not a readable .npz file ({_first_line(exc)}); write it "
                        "with numpy.savez") from None
    raise UserError(f"{where}: expected arrays x_train, y_train, x_val, y_val (or x and y), "
                    f"found {', '.join(sorted(keys)) or 'none'}")


def _npz_array(npz: np.lib.npyio.NpzFile, key: str, where: str) -> np.ndarray:
    """One array; object arrays (pickles) are refused, numbers only."""
    try:
        array = npz[key]
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise UserError(f"{where}: array {key} holds Python objects, not numbers; save "
                            "images and labels as numeric arrays (e.g. uint8 pixels, int "
                            "labels)") from None
        raise
    if array.dtype.kind not in "biuf":
        raise UserError(f"{where}: array {key} has dtype {array.dtype}; expected numbers")
    return array


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _check_pair(where: str, x_key: str, y_key: str, x: np.ndarray, y: np.ndarray) -> None:
    if x.ndim not in (3, 4):
        raise UserError(f"{where}: {x_key} must hold images shaped (n, height, width) or "
                        f"(n, height, width, channels), got shape {x.shape}")
    y_flat = np.asarray(y).reshape(len(y), -1) if len(y) else np.asarray(y)
    if len(y) != len(x) or (y_flat.ndim == 2 and y_flat.shape[1] != 1):
        raise UserError(f"{where}: labels {y_key} (shape {np.shape(y)}) do not match images "
                        f"{x_key} ({len(x)} images): give one integer label per image")
    if not np.issubdtype(np.asarray(y).dtype, np.integer) or (len(y) and np.min(y) < 0):
        raise UserError(f"{where}: labels {y_key} must be integers 0..k-1")


def _image_files(root: Path) -> dict[str, list[Path]]:
    where = f"[data] source images:{root}"
    if not root.is_dir():
        raise UserError(f"{where}: directory not found")
    classes = {d.name: sorted(p for p in d.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
               for d in sorted(root.iterdir()) if d.is_dir()}
    classes = {k: v for k, v in classes.items() if v}
    if len(classes) < 2:
        raise UserError(f"{where}: expected one sub-folder of images per class (at least 2)")
    return classes


def _read_images(root: Path, data: DataSpec, seed: int) -> Arrays:
    from PIL import Image

    xs, ys = [], []
    for label, (_, files) in enumerate(_image_files(root).items()):
        for f in files:
            with Image.open(f) as img:
                img = img.convert("RGB").resize(data.image_size[::-1])
                xs.append(np.asarray(img, dtype=np.float32) / 255.0)
            ys.append(label)
    return _split(np.stack(xs), np.asarray(ys), data.validation_split, seed)


def _read_keras(name: str) -> Arrays:
    import keras

    try:
        (x_train, y_train), (x_val, y_val) = getattr(keras.datasets, name).load_data()
    except Exception as exc:  # noqa: BLE001 - network errors come in many types
        raise RuntimeFailure(f"[data] source keras:{name}: download failed ({exc}); this "
                             "source needs internet: use npz:PATH or images:DIR offline") from None
    return _as_arrays(x_train, y_train, x_val, y_val)
