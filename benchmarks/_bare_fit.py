"""The baseline of bench_overhead: the same network, data and hyperparameters in plain Keras.

Nothing from tuner or Optuna is imported, so this is what a user's own ``model.fit`` script
costs. It prints one line ``BENCH_JSON {...}`` with wall-clock timestamps of each phase.
``--check`` instead builds this network and tuner's (``tuner.trial.build_model``) and prints
whether they are identical layer by layer.
"""

from __future__ import annotations

import time

T_MAIN = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--dropout", type=float, required=True)
    p.add_argument("--l2", type=float, required=True)
    p.add_argument("--augment", type=float, required=True)
    p.add_argument("--learning-rate", type=float, required=True)
    p.add_argument("--validation-split", type=float, required=True)
    p.add_argument("--limit", type=int)
    p.add_argument("--check", action="store_true")
    return p.parse_args()


def build(keras, args, input_shape, num_classes):  # noqa: ANN001, ANN201
    """Rotation/translation/zoom/contrast scaled by one strength, then the classic MLP."""
    s, seed = args.augment, args.seed
    reg = keras.regularizers.l2(args.l2) if args.l2 > 0 else None
    inputs = keras.Input(input_shape)
    x = inputs
    if s > 0:
        x = keras.Sequential([
            keras.layers.RandomRotation(0.1 * s, fill_mode="constant", seed=seed),
            keras.layers.RandomTranslation(0.2 * s, 0.2 * s, fill_mode="constant", seed=seed),
            keras.layers.RandomZoom(0.2 * s, fill_mode="constant", seed=seed),
            keras.layers.RandomContrast(0.5 * s, value_range=(0, 1), seed=seed),
        ])(x)
    body = keras.Sequential([
        keras.Input(input_shape),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu", kernel_regularizer=reg),
        keras.layers.Dropout(args.dropout),
        keras.layers.Dense(64, activation="relu", kernel_regularizer=reg),
        keras.layers.Dropout(args.dropout),
        keras.layers.Dense(num_classes, activation="softmax"),
    ])
    model = keras.Model(inputs, body(x))
    model.compile(optimizer=keras.optimizers.Adam(args.learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(),
                  metrics=[keras.metrics.SparseCategoricalCrossentropy(name="xent"),
                           keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    return model


def _layers(model) -> list:  # noqa: ANN001
    out = []
    for layer in model.layers:
        if hasattr(layer, "layers"):
            out += _layers(layer)
        else:
            cfg = {k: v for k, v in layer.get_config().items() if k not in ("name", "seed")}
            out.append((type(layer).__name__, json.dumps(cfg, sort_keys=True, default=str)))
    return out


def main() -> None:
    args = _args()
    import keras
    import numpy as np
    import tensorflow as tf
    from sklearn.datasets import load_digits
    t_imports = time.time()

    digits = load_digits()
    x = (digits.images[..., None] / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(args.seed).permutation(len(x))
    n_val = max(1, int(round(len(x) * args.validation_split)))
    val, train = order[:n_val], order[n_val:]
    x_tr, y_tr, x_va, y_va = x[train], y[train], x[val], y[val]
    if args.limit:
        n_v = max(1, round(args.limit * len(x_va) / (len(x_tr) + len(x_va))))
        x_tr, y_tr = x_tr[: args.limit - n_v], y_tr[: args.limit - n_v]
        x_va, y_va = x_va[:n_v], y_va[:n_v]

    def pipeline(xs, ys, shuffle):  # noqa: ANN001, ANN202
        ds = tf.data.Dataset.from_tensor_slices((xs, ys)).cache()
        if shuffle:
            ds = ds.shuffle(len(xs), seed=args.seed, reshuffle_each_iteration=True)
        return ds.batch(args.batch_size).prefetch(tf.data.AUTOTUNE)

    train_ds, val_ds = pipeline(x_tr, y_tr, True), pipeline(x_va, y_va, False)
    t_data = time.time()

    keras.utils.set_random_seed(args.seed)
    model = build(keras, args, x.shape[1:], 10)
    t_build = time.time()
    if args.check:
        from dataclasses import replace

        from tuner.space import Augmentation, Hyperparams
        from tuner.spec import ModelSpec, StudySpec
        from tuner.trial import build_model

        hp = Hyperparams(dropout=(args.dropout,), l2=args.l2,
                         augmentation=Augmentation.from_strength(args.augment),
                         learning_rate=args.learning_rate, input_shape=x.shape[1:],
                         num_classes=10)
        theirs = build_model(hp, replace(StudySpec(name="check"), model=ModelSpec()))
        same = (_layers(model) == _layers(theirs)
                and model.count_params() == theirs.count_params()
                and type(model.optimizer) is type(theirs.optimizer))
        print("BENCH_JSON " + json.dumps({"identical": same, "params": model.count_params()}))
        return
    history = model.fit(train_ds, validation_data=val_ds, epochs=args.epochs, verbose=0)
    t_fit = time.time()
    h = history.history
    best = min(range(len(h["val_xent"])), key=lambda i: h["val_xent"][i])
    print("BENCH_JSON " + json.dumps({
        "t_main": T_MAIN, "t_imports": t_imports, "t_data": t_data, "t_build": t_build,
        "t_fit": t_fit, "epochs_run": len(h["loss"]), "val_loss": h["val_xent"][best]}),
        flush=True)


if __name__ == "__main__":
    main()
