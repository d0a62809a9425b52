"""Data sources users bring: npz files (split or not) and a folder of images per class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tuner.data import check_source, load_arrays, make_datasets
from tuner.errors import UserError
from tuner.spec import DataSpec


def test_digits_split_is_seeded_and_scaled() -> None:
    a = load_arrays(DataSpec(source="digits", validation_split=0.2), seed=1)
    b = load_arrays(DataSpec(source="digits", validation_split=0.2), seed=1)
    assert a.input_shape == (8, 8, 1) and a.num_classes == 10
    assert len(a.x_val) == round(1797 * 0.2)
    np.testing.assert_array_equal(a.y_val, b.y_val)
    assert 0.0 <= a.x_train.min() and a.x_train.max() <= 1.0


def test_npz_with_explicit_validation_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=rng.integers(0, 256, (20, 6, 6, 3)), y_train=rng.integers(0, 3, 20),
             x_val=rng.integers(0, 256, (5, 6, 6, 3)), y_val=rng.integers(0, 3, (5, 1)))
    spec = DataSpec(source=f"npz:{path}")
    check_source(spec)
    arrays = load_arrays(spec)
    assert arrays.x_train.shape == (20, 6, 6, 3) and arrays.y_val.shape == (5,)
    assert arrays.x_train.max() <= 1.0  # 0-255 pixels are scaled


def test_npz_with_x_and_y_is_split(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((50, 4, 4), dtype=np.float32), y=np.arange(50) % 2)
    arrays = load_arrays(DataSpec(source=f"npz:{path}", validation_split=0.2))
    assert (len(arrays.x_train), len(arrays.x_val)) == (40, 10)
    assert arrays.input_shape == (4, 4, 1)


def test_image_folders(tmp_path: Path) -> None:
    for label, color in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (tmp_path / label).mkdir()
        for i in range(5):
            Image.new("RGB", (20, 14), color).save(tmp_path / label / f"{i}.png")
    spec = DataSpec(source=f"images:{tmp_path}", validation_split=0.2, image_size=(8, 8))
    check_source(spec)
    arrays = load_arrays(spec)
    assert arrays.input_shape == (8, 8, 3) and arrays.num_classes == 2
    assert len(arrays.x_train) + len(arrays.x_val) == 10


def test_image_folder_needs_two_classes(tmp_path: Path) -> None:
    (tmp_path / "only").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "only" / "a.png")
    with pytest.raises(UserError, match="one sub-folder of images per class"):
        check_source(DataSpec(source=f"images:{tmp_path}"))


def test_pipelines_batch_and_keep_the_validation_order() -> None:
    arrays = load_arrays(DataSpec(source="digits", limit=100))
    train, val = make_datasets(arrays, batch_size=16)
    labels = np.concatenate([y.numpy() for _, y in val])
    np.testing.assert_array_equal(labels, arrays.y_val)
    assert next(iter(train))[0].shape[1:] == (8, 8, 1)
