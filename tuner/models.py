"""Model families. A family is a plain function ``build(hp: Hyperparams) -> keras.Model``.

The function returns a model from images to class probabilities (softmax); tuner puts the
augmentation layers in front of it and compiles it, so a user's own function
(``family = "package.module:function"``) only describes the network, as in KerasTuner.
Regularized layers take ``kernel_regularizer=l2(hp.l2)`` and dropout rates come from
``hp.dropout_rate(i)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import keras

from tuner.errors import UserError
from tuner.space import Hyperparams

ModelFunction = Callable[[Hyperparams], keras.Model]


def mlp(hp: Hyperparams) -> keras.Model:
    """The classic recipe: Dense 128 → Dropout → Dense 64 → Dropout → softmax, L2 on kernels."""
    reg = keras.regularizers.l2(hp.l2) if hp.l2 > 0 else None
    return keras.Sequential([
        keras.Input(hp.input_shape),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu", kernel_regularizer=reg),
        keras.layers.Dropout(hp.dropout_rate(0)),
        keras.layers.Dense(64, activation="relu", kernel_regularizer=reg),
        keras.layers.Dropout(hp.dropout_rate(1)),
        keras.layers.Dense(hp.num_classes, activation="softmax"),
    ], name="mlp")


def cnn(hp: Hyperparams) -> keras.Model:
    """Two conv blocks and a dense head, sized for 28-32 px images (works down to 8 px)."""
    reg = keras.regularizers.l2(hp.l2) if hp.l2 > 0 else None

    def conv(filters: int) -> keras.layers.Layer:
        return keras.layers.Conv2D(filters, 3, padding="same", activation="relu",
                                   kernel_regularizer=reg)

    return keras.Sequential([
        keras.Input(hp.input_shape),
        conv(32), conv(32), keras.layers.MaxPooling2D(),
        keras.layers.Dropout(hp.dropout_rate(0)),
        conv(64), conv(64), keras.layers.MaxPooling2D(),
        keras.layers.Dropout(hp.dropout_rate(1)),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu", kernel_regularizer=reg),
        keras.layers.Dropout(hp.dropout_rate(2)),
        keras.layers.Dense(hp.num_classes, activation="softmax"),
    ], name="cnn")


FAMILIES: dict[str, ModelFunction] = {"mlp": mlp, "cnn": cnn}


def resolve_family(family: str) -> ModelFunction:
    """A built-in family by name, or a user's ``package.module:function``."""
    if family in FAMILIES:
        return FAMILIES[family]
    module_name, _, attr = family.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"[model] family: cannot import {module_name!r} ({exc}); is it on "
                        "PYTHONPATH on every worker?") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise UserError(f"[model] family: {module_name!r} has no function {attr!r}")
    return function
