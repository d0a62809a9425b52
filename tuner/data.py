"""Data sources → arrays → ``tf.data`` pipelines.

:func:`check_source` is cheap (numpy only) and runs before anything is written to a study, so
a missing or malformed ``npz:`` file is a user error, not a crashed worker. :func:`load_arrays`
is called once per worker process and reused by every trial; :func:`make_datasets` wraps the
arrays in cached, prefetched ``tf.data`` pipelines (numpy inputs make TensorFlow stall at each
epoch start while it tears down the previous iterator).

The arrays keep the pixel values the source holds (0-255 for most images, 0-16 for the
digits): the model's first layer rescales them (:attr:`Arrays.scale`), so a saved model takes
the data in the form the source provides, with no hidden preprocessing.

Splits: a source's own test part (``x_test``/``y_test`` in an npz, a ``test/`` folder beside
the class folders, the test set of a ``keras:`` dataset) is used as it is; otherwise
``test_split`` holds out that fraction for the test. The test part never takes part in
selection: each completed trial scores its best-epoch model on it once. ``limit`` keeps a
stratified sample (same class proportions) of every part, drawn with the study's seed.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from tuner.errors import RuntimeFailure, UserError
from tuner.spec import DataSpec, source_kind

if TYPE_CHECKING:
    import tensorflow as tf

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}
TEST_FOLDER = "test"  # images:DIR/test/<class>/... is the test part of an image folder
# Validation and test batches: up to this many times the training batch, and at most this many
# input values a batch (16 MiB of float32: a large image keeps the training batch size).
INFERENCE_BATCH_FACTOR = 16
INFERENCE_BATCH_VALUES = 1 << 22
# The fixed training sample that measures the honest training loss: as large as the validation
# set, up to this many images. It rides along in every epoch's validation pass: on an
# MNIST-sized split (12,000 validation images) an uncapped sample cost the cnn family 4.5 % of
# every epoch, this cap 1.2 %, for a standard error of its mean loss of at most 0.005
# (benchmarks/RESULTS.md, section 1b). Selection uses the whole validation set either way.
TRAIN_SAMPLE_MAX = 4096


@dataclass(frozen=True)
class Arrays:
    """Images as float32 ``(n, h, w, c)`` in the source's own value range, integer labels
    ``0..k-1``, and the factor that brings the images to [0, 1] (the model applies it)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    scale: float = 1.0

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        labels = [self.y_train, self.y_val] + ([self.y_test] if self.y_test is not None else [])
        return int(max(y.max() for y in labels if len(y))) + 1

    @property
    def has_test(self) -> bool:
        return self.x_test is not None and len(self.x_test) > 0


class Datasets(NamedTuple):
    """The pipelines one trial trains and measures on."""

    train: tf.data.Dataset  # shuffled every epoch
    val: tf.data.Dataset
    # fixed, as large as val up to TRAIN_SAMPLE_MAX images: for the train loss
    train_sample: tuple[np.ndarray, np.ndarray]
    # ``(x, y, weight 1)``: the structure of ``val_and_train_sample``, so that scoring a
    # trial on it reuses the step Keras traced for the validation pass (0.15-0.3 s a trial)
    test: tf.data.Dataset | None
    # The validation images (weight 1), then the training sample (weight 0), as
    # ``(x, y, weight)``: one validation pass measures both losses (see tuner.trial).
    val_and_train_sample: tf.data.Dataset | None = None


def check_source(data: DataSpec) -> None:
    """Fail fast, without TensorFlow, on a data source that cannot load."""
    kind, rest = source_kind(data.source)
    if kind == "npz":
        _read_npz(Path(rest), data)
    elif kind == "images":
        _check_test_split(data, _image_files(Path(rest))[1] is not None)
    elif kind == "keras":
        _check_test_split(data, True)  # Keras' datasets come with their test part


def load_arrays(data: DataSpec, seed: int = 0) -> Arrays:
    """Load and split a source; the split is seeded so every worker sees the same one."""
    kind, rest = source_kind(data.source)
    if kind == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        arrays = _split(digits.images[..., None], digits.target, data, seed, scale=1 / 16)
    elif kind == "npz":
        arrays = _read_npz(Path(rest), data, seed)
    elif kind == "images":
        arrays = _read_images(Path(rest), data, seed)
    elif kind == "keras":
        arrays = _read_keras(rest, data, seed)
    else:  # validated by the spec parser
        raise UserError(f"unknown data source {data.source!r}")
    if data.limit is not None:
        arrays = _limit(arrays, data.limit, seed)
    return arrays


def make_datasets(arrays: Arrays, batch_size: int, seed: int = 0) -> Datasets:
    """Cached, batched and prefetched pipelines; only the training one is shuffled.

    The validation and test pipelines run in larger batches than training (see
    :func:`inference_batch_size`): each batch costs Keras a Python round of its own, more than
    the arithmetic of a small model. The figures are the same (means over every image)."""
    import tensorflow as tf

    inference_batch = inference_batch_size(batch_size, arrays.input_shape)

    def pipeline(x: np.ndarray, y: np.ndarray, shuffle: bool = False) -> tf.data.Dataset:
        ds = tf.data.Dataset.from_tensor_slices((x, y)).cache()
        if shuffle:
            # The order follows the global seed too: fix it, so that the order does not
            # depend on what this process trained before (an earlier study, a benchmark).
            tf.random.set_seed(seed)
            ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
            return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
        return ds.batch(inference_batch).prefetch(tf.data.AUTOTUNE)

    size = min(len(arrays.x_val), TRAIN_SAMPLE_MAX)
    sample = np.random.default_rng(seed).permutation(len(arrays.x_train))[:size]
    sample.sort()
    x_sample, y_sample = arrays.x_train[sample], arrays.y_train[sample]
    test = None
    if arrays.has_test:
        test = tf.data.Dataset.from_tensor_slices(
            (arrays.x_test, arrays.y_test, np.ones(len(arrays.y_test), np.float32)))
        test = test.cache().batch(inference_batch).prefetch(tf.data.AUTOTUNE)
    weights = np.concatenate([np.ones(len(arrays.y_val), np.float32),
                              np.zeros(len(y_sample), np.float32)])
    both = tf.data.Dataset.from_tensor_slices(
        (np.concatenate([arrays.x_val, x_sample]), np.concatenate([arrays.y_val, y_sample]),
         weights))
    return Datasets(pipeline(arrays.x_train, arrays.y_train, shuffle=True),
                    pipeline(arrays.x_val, arrays.y_val), (x_sample, y_sample), test,
                    both.cache().batch(inference_batch).prefetch(tf.data.AUTOTUNE))


def inference_batch_size(batch_size: int, input_shape: tuple[int, ...]) -> int:
    """Up to ``INFERENCE_BATCH_FACTOR`` training batches, within ``INFERENCE_BATCH_VALUES``
    input values: without gradients a batch keeps only the activations of the layer at hand,
    and the bound keeps large images at the training batch size."""
    values = max(1, math.prod(input_shape))
    return max(batch_size, min(batch_size * INFERENCE_BATCH_FACTOR,
                               INFERENCE_BATCH_VALUES // values))


# --- splits ------------------------------------------------------------------------------------


def _split(x: np.ndarray, y: np.ndarray, data: DataSpec, seed: int, scale: float | None = None,
           x_test: np.ndarray | None = None, y_test: np.ndarray | None = None) -> Arrays:
    """Hold out ``test_split`` (unless the source brought a test part), then validation."""
    rng = np.random.default_rng(seed)
    if x_test is None and data.test_split:
        order = np.random.default_rng([seed, 1]).permutation(len(x))
        n_test = max(1, int(round(len(x) * data.test_split)))
        test, rest = order[:n_test], order[n_test:]
        x_test, y_test, x, y = x[test], y[test], x[rest], y[rest]
    order = rng.permutation(len(x))
    n_val = max(1, int(round(len(x) * data.validation_split)))
    val, train = order[:n_val], order[n_val:]
    return _as_arrays(x[train], y[train], x[val], y[val], x_test, y_test, scale)


def _limit(arrays: Arrays, limit: int, seed: int) -> Arrays:
    """A stratified sample of ``limit`` images over all parts, each part in proportion."""
    parts = [("train", arrays.x_train, arrays.y_train), ("val", arrays.x_val, arrays.y_val)]
    if arrays.has_test:
        parts.append(("test", arrays.x_test, arrays.y_test))
    total = sum(len(y) for _, _, y in parts)
    if limit >= total:
        return arrays
    rng = np.random.default_rng([seed, 2])
    cut = {}
    sizes = _apportion(limit, [len(y) for _, _, y in parts])
    for (name, x, y), n in zip(parts, sizes, strict=True):
        keep = _stratified(y, n, rng)
        cut[f"x_{name}"], cut[f"y_{name}"] = x[keep], y[keep]
    return replace(arrays, **cut)


def _apportion(limit: int, sizes: list[int]) -> list[int]:
    """``limit`` split over parts of ``sizes`` in proportion, by largest remainders, so the
    parts add up to ``limit`` exactly (rounding each part alone can go one over); every part
    keeps at least one image."""
    total = sum(sizes)
    quotas = [limit * size / total for size in sizes]
    take = [max(1, int(q)) for q in quotas]
    for i in sorted(range(len(sizes)), key=lambda i: take[i] - quotas[i]):
        if sum(take) >= limit:
            break
        take[i] += 1
    return take


def _stratified(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices of ``y`` with every class in its proportion (largest remainders)."""
    classes, counts = np.unique(y, return_counts=True)
    quotas = counts * n / len(y)
    take = np.floor(quotas).astype(int)
    for i in np.argsort(quotas - take)[::-1][: n - take.sum()]:
        take[i] += 1
    picked = [rng.choice(np.flatnonzero(y == c), k, replace=False)
              for c, k in zip(classes, take, strict=True) if k]
    return np.sort(np.concatenate(picked))


def _as_arrays(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
               x_test: np.ndarray | None = None, y_test: np.ndarray | None = None,
               scale: float | None = None) -> Arrays:
    def images(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return x[..., None] if x.ndim == 3 else x

    def labels(y: np.ndarray) -> np.ndarray:
        return np.asarray(y).reshape(-1).astype(np.int64)

    xs = [images(x_train), images(x_val)]
    if x_test is not None and len(x_test):
        xs.append(images(x_test))
    if scale is None:  # values above 1 are 0-255 pixels
        scale = 1 / 255 if max(float(x.max()) for x in xs if x.size) > 1.0 else 1.0
    test = len(xs) == 3
    return Arrays(xs[0], labels(y_train), xs[1], labels(y_val),
                  xs[2] if test else None, labels(y_test) if test else None, scale)


def _check_test_split(data: DataSpec, has_test: bool) -> None:
    if has_test and data.test_split:
        raise UserError(f"[data] test_split: the source {data.source} has a test part of its "
                        "own; remove test_split (or the test part)")


# --- npz ---------------------------------------------------------------------------------------

_SPLIT_KEYS = ("x_train", "y_train", "x_val", "y_val")


def _read_npz(path: Path, data: DataSpec, seed: int = 0) -> Arrays:
    where = f"[data] source npz:{path}"
    if not path.is_file():
        raise UserError(f"{where}: file not found{_relative_hint(path)}")
    if not zipfile.is_zipfile(path):  # np.load would try it as a pickle, and say so
        raise UserError(f"{where}: not a .npz file (a zip of .npy arrays); write it with "
                        "numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            test = None
            if len(keys & {"x_test", "y_test"}) == 1:
                (has,) = keys & {"x_test", "y_test"}
                (lacks,) = {"x_test", "y_test"} - keys
                raise UserError(f"{where}: has {has} but not {lacks}; a test part needs both")
            if {"x_test", "y_test"} <= keys:
                test = (_npz_array(npz, "x_test", where), _npz_array(npz, "y_test", where))
                _check_pair(where, "x_test", "y_test", *test)
                _check_test_split(data, True)
            if set(_SPLIT_KEYS) <= keys:
                parts = [_npz_array(npz, k, where) for k in _SPLIT_KEYS]
                for x_key, y_key, x, y in (("x_train", "y_train", parts[0], parts[1]),
                                           ("x_val", "y_val", parts[2], parts[3])):
                    _check_pair(where, x_key, y_key, x, y)
                _check_same_images(where, [("x_train", parts[0]), ("x_val", parts[2])]
                                   + ([("x_test", test[0])] if test else []))
                _check_test_labels(where, test, parts[1], parts[3])
                if test is None and data.test_split:
                    raise UserError(f"[data] test_split: {where} is already split into train "
                                    "and validation; add x_test and y_test to it instead")
                return _as_arrays(*parts, *(test or (None, None)))
            if {"x", "y"} <= keys:
                x, y = _npz_array(npz, "x", where), _npz_array(npz, "y", where)
                _check_pair(where, "x", "y", x, y)
                _check_same_images(where, [("x", x)] + ([("x_test", test[0])] if test else []))
                _check_test_labels(where, test, y)
                return _split(x, y, data, seed, None, *(test or (None, None)))
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"{where}: not a readable .npz file ({_first_line(exc)}); write it "
                        "with numpy.savez") from None
    raise UserError(f"{where}: expected arrays x_train, y_train, x_val, y_val (or x and y), "
                    f"and optionally x_test, y_test; found {', '.join(sorted(keys)) or 'none'}")


def _relative_hint(path: Path) -> str:
    """Where a relative path was looked for: the directory the command runs in, on every
    worker, not the study file's (workers read the study from the database)."""
    if path.is_absolute():
        return ""
    return (f" (looked for {Path.cwd() / path}: a relative path is read from the directory "
            "each command runs in; an absolute path is the same on every node)")


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
        raise UserError(f"{where}: array {key} has dtype {array.dtype}; expected numbers "
                        "(class names: number them 0..k-1)")
    return array


def _check_same_images(where: str, parts: list[tuple[str, np.ndarray]]) -> None:
    """Every part holds images of one shape (a missing channel axis means 1 channel), with
    pixels the model can be given: 0-255 or 0-1."""
    def shape(x: np.ndarray) -> tuple[int, ...]:
        return tuple(x.shape[1:]) + ((1,) if x.ndim == 3 else ())

    first_key, first = parts[0]
    for key, x in parts[1:]:
        if len(x) and shape(x) != shape(first):
            raise UserError(f"{where}: {key} holds images of shape {shape(x)} but {first_key} "
                            f"of shape {shape(first)}; every part must have the same size and "
                            "channels")
    for key, x in parts:
        if x.size and (float(x.max()) > 255 or float(x.min()) < 0):
            raise UserError(f"{where}: {key} holds values from {x.min():g} to {x.max():g}; "
                            "expected pixels 0-255 (divided by 255) or 0-1 (used as they are)")


def _check_test_labels(where: str, test: tuple[np.ndarray, np.ndarray] | None,
                       *labelled: np.ndarray) -> None:
    """A test label that no other image has names a class the model never saw."""
    if test is None:
        return
    seen = set(np.concatenate([np.asarray(y).reshape(-1) for y in labelled]).tolist())
    unseen = sorted(set(np.asarray(test[1]).reshape(-1).tolist()) - seen)
    if unseen:
        raise UserError(f"{where}: y_test has labels {unseen[:5]} that no training or "
                        "validation image has; the test part must use the same classes")


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


# --- image folders -----------------------------------------------------------------------------


def _image_files(root: Path) -> tuple[dict[str, list[Path]], dict[str, list[Path]] | None]:
    """(class → files, test class → files or ``None``); the test classes must be known ones."""
    where = f"[data] source images:{root}"
    if not root.is_dir():
        raise UserError(f"{where}: directory not found{_relative_hint(root)}")
    classes = _class_folders(root, skip=TEST_FOLDER)
    if len(classes) < 2:
        raise UserError(f"{where}: expected one sub-folder of images per class (at least 2)")
    test = None
    if (root / TEST_FOLDER).is_dir():
        test = _class_folders(root / TEST_FOLDER)
        unknown = sorted(set(test) - set(classes))
        if unknown:
            raise UserError(f"{where}: {TEST_FOLDER}/{unknown[0]} is not one of the classes "
                            f"({', '.join(classes)})")
    return classes, test


def _class_folders(root: Path, skip: str | None = None) -> dict[str, list[Path]]:
    """Class i is the i-th folder in sorted order, as in Keras' image_dataset_from_directory;
    a folder without images would shift every later class, so it is an error."""
    found = {d.name: sorted(p for p in d.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES
                            and not p.name.startswith("."))
             for d in sorted(root.iterdir())
             if d.is_dir() and d.name != skip and not d.name.startswith(".")}
    empty = [name for name, files in found.items() if not files]
    if empty:
        raise UserError(f"[data] source images:{root}: folder {empty[0]}/ holds no images "
                        f"({', '.join(sorted(_IMAGE_SUFFIXES))}) directly inside it; each "
                        "class folder needs some, or remove it")
    return found


def _read_images(root: Path, data: DataSpec, seed: int) -> Arrays:
    from PIL import Image

    classes, test = _image_files(root)
    labels = {name: i for i, name in enumerate(classes)}

    def read(folders: dict[str, list[Path]]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for name, files in folders.items():
            for f in files:
                try:
                    with Image.open(f) as img:
                        img = img.convert("RGB").resize(data.image_size[::-1])
                        xs.append(np.asarray(img, dtype=np.float32))
                except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError too
                    raise UserError(f"[data] source images:{root}: cannot read {f} "
                                    f"({_first_line(exc)}); delete or fix it") from None
                ys.append(labels[name])
        return np.stack(xs), np.asarray(ys)

    x, y = read(classes)
    x_test, y_test = read(test) if test else (None, None)
    return _split(x, y, data, seed, 1 / 255, x_test, y_test)


def _read_keras(name: str, data: DataSpec, seed: int) -> Arrays:
    _check_test_split(data, True)  # Keras' datasets come with their test part
    import keras

    try:
        (x_train, y_train), (x_test, y_test) = getattr(keras.datasets, name).load_data()
    except Exception as exc:  # noqa: BLE001 - network errors come in many types
        raise RuntimeFailure(f"[data] source keras:{name}: download failed ({exc}); this "
                             "source needs internet: use npz:PATH or images:DIR offline") from None
    return _split(x_train, np.asarray(y_train).reshape(-1), data, seed, 1 / 255, x_test,
                  np.asarray(y_test).reshape(-1))
