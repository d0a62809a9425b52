"""tuner: search dropout, L2 and augmentation strength for a Keras image model.

An Optuna study in a database is the coordinator; any number of workers pull trials from it.
See ``tuner --help`` and README.md.
"""

__version__ = "0.1.0"
