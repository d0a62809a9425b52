"""tuner: search dropout, L2 and augmentation strength for a Keras image model.

An Optuna study in a database is the coordinator; any number of workers pull trials from it.
Most users need only the ``tuner`` command (``tuner --help``, README.md). A model function of
your own (``[model] family = "package.module:function"``) takes a :class:`Hyperparams`::

    import keras
    from tuner import Hyperparams

    def wide(hp: Hyperparams) -> keras.Model:
        reg = keras.regularizers.l2(hp.l2)
        return keras.Sequential([
            keras.Input(hp.input_shape),
            keras.layers.Flatten(),
            keras.layers.Dense(512, activation="relu", kernel_regularizer=reg),
            keras.layers.Dropout(hp.dropout_rate(0)),
            keras.layers.Dense(hp.num_classes, activation="softmax"),
        ])

and scripts read study files with :func:`load_spec`. Everything else in the package is
internal: its modules may change between releases.
"""

from tuner.space import Augmentation, Hyperparams
from tuner.spec import StudySpec, load_spec

__version__ = "0.1.0"
__all__ = ["Augmentation", "Hyperparams", "StudySpec", "__version__", "load_spec"]
