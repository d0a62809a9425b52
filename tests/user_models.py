"""Model functions a user might write (``family = "user_models:NAME"``), used by the tests."""

from __future__ import annotations

import keras

from tuner.space import Hyperparams


def tiny(hp: Hyperparams) -> keras.Model:
    """A one-hidden-layer network that reads every knob it is given."""
    reg = keras.regularizers.l2(hp.l2) if hp.l2 > 0 else None
    return keras.Sequential([
        keras.Input(hp.input_shape),
        keras.layers.Flatten(),
        keras.layers.Dense(16, activation="relu", kernel_regularizer=reg),
        keras.layers.Dropout(hp.dropout_rate(0)),
        keras.layers.Dense(hp.num_classes, activation="softmax"),
    ])


def diverges(hp: Hyperparams) -> keras.Model:
    """Outputs NaN from the first step: the trial must fail with the reason, not crash."""
    return keras.Sequential([
        keras.Input(hp.input_shape),
        keras.layers.Flatten(),
        keras.layers.Dense(hp.num_classes),
        keras.layers.Lambda(lambda x: x * float("nan")),
        keras.layers.Softmax(),
    ])


def broken(hp: Hyperparams) -> keras.Model:
    """A bug in a user's model function."""
    raise ValueError("layer sizes do not fit: this is the user's bug")
