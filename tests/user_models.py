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


def _with_numpy_step(hp: Hyperparams, step: object) -> keras.Model:
    """A network whose forward pass calls ``step(x)`` in Python, inside TensorFlow's runtime."""
    import tensorflow as tf

    def call(x):  # noqa: ANN001, ANN202
        y = tf.numpy_function(step, [x], tf.float32, stateful=True)
        return tf.ensure_shape(y, x.shape)

    return keras.Sequential([
        keras.Input(hp.input_shape),
        keras.layers.Flatten(),
        keras.layers.Lambda(call),
        keras.layers.Dense(hp.num_classes, activation="softmax"),
    ])


def slow(hp: Hyperparams) -> keras.Model:
    """Each training step sleeps a little: a trial that runs long, but can be stopped."""
    import time

    def pause(x):  # noqa: ANN001, ANN202 - numpy in, numpy out
        time.sleep(0.05)
        return x

    return _with_numpy_step(hp, pause)


def hangs(hp: Hyperparams) -> keras.Model:
    """The first training step never returns to Python: stuck inside a native call that no
    signal cuts short (as a deadlocked CUDA or collective call would be). It touches the file
    ``$STUCK_MARKER`` names, if any, once it is stuck."""
    import ctypes
    import os
    import signal
    from pathlib import Path

    def forever(x):  # noqa: ANN001, ANN202
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        if os.environ.get("STUCK_MARKER"):
            Path(os.environ["STUCK_MARKER"]).touch()
        ctypes.CDLL(None).sleep(3600)
        return x

    return _with_numpy_step(hp, forever)


def crashes(hp: Hyperparams) -> keras.Model:
    """The process dies of a segmentation fault as the model is built: a native crash that
    no Python handler sees, every time."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGSEGV)
    raise AssertionError("unreachable")


def forgot_the_model(hp: Hyperparams) -> int:
    """Returns something that is not a network (a user's slip)."""
    return 42
