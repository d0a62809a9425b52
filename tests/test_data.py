"""Data sources users bring: npz files (split or not) and a folder of images per class, their
test parts, and samples that keep every class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tuner import data
from tuner.data import check_source, inference_batch_size, load_arrays, make_datasets
from tuner.errors import UserError
from tuner.spec import DataSpec


def test_digits_split_is_seeded_and_kept_in_the_sources_own_range() -> None:
    a = load_arrays(DataSpec(source="digits", validation_split=0.2), seed=1)
    b = load_arrays(DataSpec(source="digits", validation_split=0.2), seed=1)
    assert a.input_shape == (8, 8, 1) and a.num_classes == 10
    assert len(a.x_val) == round(1797 * 0.2)
    np.testing.assert_array_equal(a.y_val, b.y_val)
    # the model rescales: the arrays hold the digits' own 0-16 values
    assert a.x_train.max() == 16.0 and a.scale == 1 / 16
    assert not a.has_test


def test_npz_with_explicit_validation_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=rng.integers(0, 256, (20, 6, 6, 3)), y_train=rng.integers(0, 3, 20),
             x_val=rng.integers(0, 256, (5, 6, 6, 3)), y_val=rng.integers(0, 3, (5, 1)))
    spec = DataSpec(source=f"npz:{path}")
    check_source(spec)
    arrays = load_arrays(spec)
    assert arrays.x_train.shape == (20, 6, 6, 3) and arrays.y_val.shape == (5,)
    assert arrays.x_train.max() > 1.0 and arrays.scale == 1 / 255  # 0-255, scaled in the model


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


def test_an_image_folder_without_images_is_named_not_skipped(tmp_path: Path) -> None:
    """Class i is the i-th folder: a skipped empty one would shift the classes after it."""
    for label in ("a", "b", "c"):
        (tmp_path / label).mkdir()
    for label in ("a", "c"):
        Image.new("RGB", (4, 4)).save(tmp_path / label / "0.png")
    (tmp_path / "b" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match=r"folder b/ holds no images"):
        check_source(DataSpec(source=f"images:{tmp_path}"))


def test_an_unreadable_image_is_named(tmp_path: Path) -> None:
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / label / "0.png")
    (tmp_path / "a" / "1.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"cannot read .*a/1\.png .*delete or fix it"):
        load_arrays(DataSpec(source=f"images:{tmp_path}", image_size=(4, 4)))


def test_a_keras_dataset_has_its_own_test_part() -> None:
    with pytest.raises(UserError, match="has a test part of its own; remove test_split"):
        check_source(DataSpec(source="keras:mnist", test_split=0.2))


def test_image_folder_needs_two_classes(tmp_path: Path) -> None:
    (tmp_path / "only").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "only" / "a.png")
    with pytest.raises(UserError, match="one sub-folder of images per class"):
        check_source(DataSpec(source=f"images:{tmp_path}"))


def test_validation_runs_in_large_batches_but_large_images_keep_the_training_batch() -> None:
    assert inference_batch_size(64, (8, 8, 1)) == 1024  # small images: 16 training batches
    assert inference_batch_size(64, (32, 32, 3)) == 1024
    assert inference_batch_size(32, (224, 224, 3)) == 32  # never below the training batch
    assert inference_batch_size(16, (128, 128, 3)) == 85  # 16 MiB of float32 input
    arrays = load_arrays(DataSpec(source="digits"))
    datasets = make_datasets(arrays, batch_size=64)
    assert [len(y) for _, y in datasets.val] == [len(arrays.y_val)]  # 450 images, one batch
    assert next(iter(datasets.train))[0].shape[0] == 64


def test_pipelines_batch_and_keep_the_validation_order() -> None:
    arrays = load_arrays(DataSpec(source="digits", limit=100))
    datasets = make_datasets(arrays, batch_size=16)
    labels = np.concatenate([y.numpy() for _, y in datasets.val])
    np.testing.assert_array_equal(labels, arrays.y_val)
    assert next(iter(datasets.train))[0].shape[1:] == (8, 8, 1)
    # the validation pass of a trial: validation images weighted 1, the training sample 0
    batches = list(datasets.val_and_train_sample)
    labels = np.concatenate([y.numpy() for _, y, _ in batches])
    weights = np.concatenate([w.numpy() for _, _, w in batches])
    np.testing.assert_array_equal(labels, np.concatenate([arrays.y_val,
                                                          datasets.train_sample[1]]))
    np.testing.assert_array_equal(weights, [1] * len(arrays.y_val) + [0] * len(labels[
        len(arrays.y_val):]))


def test_npz_test_part_is_kept_apart(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x=rng.random((40, 4, 4)).astype(np.float32), y=np.arange(40) % 2,
             x_test=rng.random((7, 4, 4)).astype(np.float32), y_test=np.arange(7) % 2)
    arrays = load_arrays(DataSpec(source=f"npz:{path}", validation_split=0.25))
    assert (len(arrays.x_train), len(arrays.x_val), len(arrays.x_test)) == (30, 10, 7)
    assert arrays.scale == 1.0  # already in [0, 1]
    with pytest.raises(UserError, match="has a test part of its own"):
        check_source(DataSpec(source=f"npz:{path}", test_split=0.2))


def test_test_split_holds_out_a_fraction_before_validation() -> None:
    arrays = load_arrays(DataSpec(source="digits", validation_split=0.25, test_split=0.2))
    assert len(arrays.x_test) == round(1797 * 0.2)
    assert len(arrays.x_val) == round((1797 - len(arrays.x_test)) * 0.25)
    assert len(arrays.x_train) + len(arrays.x_val) + len(arrays.x_test) == 1797
    without = load_arrays(DataSpec(source="digits", validation_split=0.25))
    assert not without.has_test


def test_image_folder_with_a_test_folder(tmp_path: Path) -> None:
    for part, n in (("", 6), ("test/", 2)):
        for label, color in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
            folder = tmp_path / f"{part}{label}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (10, 10), color).save(folder / f"{i}.png")
    spec = DataSpec(source=f"images:{tmp_path}", validation_split=0.25, image_size=(8, 8))
    check_source(spec)
    arrays = load_arrays(spec)
    assert arrays.num_classes == 2  # "test" is not a class
    assert len(arrays.x_test) == 4 and sorted(arrays.y_test) == [0, 0, 1, 1]
    assert len(arrays.x_train) + len(arrays.x_val) == 12
    # the test images belong to the class of the same name
    assert arrays.x_test[arrays.y_test == 0][..., 0].min() == 255.0


def test_limit_keeps_every_class_of_a_class_sorted_source(tmp_path: Path) -> None:
    """A folder-like source, sorted by class: the first N images would be one class only."""
    path = tmp_path / "sorted.npz"
    y = np.repeat(np.arange(5), 40)  # 40 images of class 0, then 40 of class 1, ...
    x = np.repeat(np.arange(5, dtype=np.float32), 40)[:, None, None] * np.ones((1, 4, 4))
    np.savez(path, x_train=x[:150], y_train=y[:150], x_val=x[150:], y_val=y[150:])
    arrays = load_arrays(DataSpec(source=f"npz:{path}", limit=50), seed=3)
    assert len(arrays.x_train) + len(arrays.x_val) == 50
    # The training part held 40, 40, 40 and 30 images of classes 0-3: 38 of them in proportion.
    train_classes, counts = np.unique(arrays.y_train, return_counts=True)
    assert list(train_classes) == [0, 1, 2, 3] and list(counts) == [10, 10, 10, 8]
    assert set(arrays.y_val) == {3, 4}  # the validation part had only those
    again = load_arrays(DataSpec(source=f"npz:{path}", limit=50), seed=3)
    np.testing.assert_array_equal(arrays.y_train, again.y_train)  # seeded


def test_limit_is_the_number_of_images_kept_even_when_every_part_rounds_up(
        tmp_path: Path) -> None:
    """Parts of 67, 67 and 66 images at limit = 100 are 33.5, 33.5 and 33 images each:
    rounding each part alone keeps 101."""
    path = tmp_path / "three.npz"
    y = np.arange(200) % 2
    x = np.ones((200, 4, 4), np.float32)
    np.savez(path, x_train=x[:67], y_train=y[:67], x_val=x[67:134], y_val=y[67:134],
             x_test=x[134:], y_test=y[134:])
    arrays = load_arrays(DataSpec(source=f"npz:{path}", limit=100), seed=0)
    sizes = [len(arrays.y_train), len(arrays.y_val), len(arrays.y_test)]
    assert sum(sizes) == 100 and sorted(sizes) == [33, 33, 34]


def test_pipelines_hold_a_fixed_training_sample_as_large_as_validation() -> None:
    arrays = load_arrays(DataSpec(source="digits", limit=200))
    datasets = make_datasets(arrays, batch_size=16)
    x, y = datasets.train_sample
    assert len(x) == len(y) == len(arrays.x_val)
    np.testing.assert_array_equal(y, make_datasets(arrays, batch_size=16).train_sample[1])
    assert datasets.test is None


def test_the_training_sample_stops_growing_at_its_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """A large validation set does not double every epoch's validation pass: the sample is
    capped, the validation set is not, and the capped sample is the uncapped one's start."""
    arrays = load_arrays(DataSpec(source="digits", limit=200))
    whole = make_datasets(arrays, batch_size=16).train_sample
    monkeypatch.setattr(data, "TRAIN_SAMPLE_MAX", 10)
    datasets = make_datasets(arrays, batch_size=16)
    x, y = datasets.train_sample
    assert len(x) == len(y) == 10 < len(arrays.x_val)
    weights = np.concatenate([w.numpy() for _, _, w in datasets.val_and_train_sample])
    assert (weights == 1).sum() == len(arrays.x_val) and (weights == 0).sum() == 10
    # the same training images, drawn from the same seeded order
    assert set(map(bytes, x)) <= set(map(bytes, whole[0]))


def test_the_training_order_does_not_depend_on_what_the_process_seeded_before() -> None:
    """A seeded study repeats itself even in a process that trained something else first."""
    import tensorflow as tf

    arrays = load_arrays(DataSpec(source="digits", limit=200))
    orders = []
    for earlier in (1, 99):
        tf.random.set_seed(earlier)  # what an earlier study or script left behind
        train = make_datasets(arrays, batch_size=16, seed=3).train
        orders.append([np.concatenate([y.numpy() for _, y in train]) for _ in range(2)])
    np.testing.assert_array_equal(orders[0][0], orders[1][0])
    np.testing.assert_array_equal(orders[0][1], orders[1][1])  # and every epoch after
    assert not np.array_equal(orders[0][0], orders[0][1])  # reshuffled each epoch


def test_scoring_on_the_test_part_reuses_the_validation_pass_step() -> None:
    """A trial's test score runs through the step Keras traced for its validation pass: a new
    trace would cost each completed trial 0.15-0.3 s. Python code in a layer runs only while
    TensorFlow traces, so the layer below counts traces."""
    import keras

    class Traces(keras.layers.Layer):
        count = 0

        def call(self, x, training=None):
            if not training:
                Traces.count += 1
            return x

    arrays = load_arrays(DataSpec(source="digits", limit=300, test_split=0.2))
    datasets = make_datasets(arrays, batch_size=64)
    inputs = keras.Input(arrays.input_shape)
    outputs = keras.layers.Dense(10, activation="softmax")(
        keras.layers.Flatten()(Traces()(inputs)))
    model = keras.Model(inputs, outputs)
    model.compile("adam", "sparse_categorical_crossentropy",
                  weighted_metrics=[keras.metrics.SparseCategoricalCrossentropy(name="xent")])
    model.fit(datasets.train, validation_data=datasets.val_and_train_sample, epochs=1,
              verbose=0)
    traced = Traces.count
    scores = model.evaluate(datasets.test, verbose=0, return_dict=True)
    assert Traces.count == traced
    # the weights are all 1: the same figure as the plain images and labels give
    plain = model.evaluate(arrays.x_test, arrays.y_test, verbose=0, return_dict=True)
    assert scores["xent"] == pytest.approx(plain["xent"], rel=1e-5)
    assert Traces.count > traced  # (x, y) alone is another structure: the count sees it
