"""Augmentation factors → a ``keras.Sequential`` of preprocessing layers.

The layers live inside the model, so they run on the GPU with the rest of the step and are
inactive at inference (Keras random preprocessing layers are identity when ``training=False``).
A transform whose factor is 0 adds no layer; all factors 0 and no flip gives ``None``.
"""

from __future__ import annotations

import keras

from tuner.space import Augmentation


def build_augmentation(aug: Augmentation, seed: int | None = None) -> keras.Sequential | None:
    """The preprocessing layers for ``aug``, or ``None`` when it does nothing."""
    layers: list[keras.layers.Layer] = []
    if aug.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if aug.rotation > 0:
        layers.append(keras.layers.RandomRotation(aug.rotation, fill_mode="constant",
                                                  seed=seed))
    if aug.translation > 0:
        layers.append(keras.layers.RandomTranslation(aug.translation, aug.translation,
                                                     fill_mode="constant", seed=seed))
    if aug.zoom > 0:
        layers.append(keras.layers.RandomZoom(aug.zoom, fill_mode="constant", seed=seed))
    if aug.contrast > 0:
        layers.append(keras.layers.RandomContrast(min(aug.contrast, 1.0), value_range=(0, 1),
                                                  seed=seed))
    return keras.Sequential(layers, name="augmentation") if layers else None
