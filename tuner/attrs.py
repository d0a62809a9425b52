"""The names tuner writes into Optuna's attribute tables.

Everything a user, the dashboard or Optuna's CLI reads back is spelled here once: a study's
attributes (its spec, where its models live, when its clock started) and a trial's (what it
measured, where it ran, why it failed). Readers and writers import the constant, never the
string.
"""

from __future__ import annotations

# --- study attributes ----------------------------------------------------------------------
SPEC = "spec"  # the study file as JSON: what every worker needs to run a trial
ARTIFACTS = "artifacts"  # the directory of saved models, recorded when the study was created
CLOCK_STARTED = "clock_started_at"  # UTC seconds when the first trial was claimed (time budget)
FIGURES_UPDATED = "figures_updated_at"  # UTC seconds of the last dashboard figure update
FIGURES_SECONDS = "figures_seconds"  # its processor seconds: the next waits 50 times as long
CONFIRM = "confirm"  # the confirm step: {"top", "seeds", "configs": [trial numbers], "trials"}

# --- trial attributes ----------------------------------------------------------------------
HOST = "host"
GPU = "gpu"
PID = "pid"
STARTED_AT = "started_at"  # UTC seconds; the trial's own clock, whatever the worker's time zone
CURVE = "curve"  # per epoch: {"t": [seconds since STARTED_AT], "train_loss": [], "val_loss": []}
VAL_ACCURACY = "val_accuracy"
TRAIN_LOSS = "train_loss"  # inference mode (no dropout, no augmentation), no L2 penalty
TRAIN_LOSS_TRAINING_MODE = "train_loss_training_mode"  # Keras' own, dropout and augmentation on
TEST_LOSS = "test_loss"  # the best-epoch model on the test split (never used to select)
TEST_ACCURACY = "test_accuracy"
GAP = "gap"
KERAS_VAL_LOSS = "keras_val_loss"
BEST_EPOCH = "best_epoch"
EPOCHS_RUN = "epochs_run"
PRUNED_AT = "pruned_at"
SECONDS = "seconds"
MODEL_ARTIFACT = "model_artifact"
FAIL_REASON = "fail_reason"

# Trial system attribute: the number of the trial whose configuration this one retrains with a
# new seed (the confirm step). A system attribute, so that a retry after a crash keeps it.
CONFIRMS = "tuner:confirms"

# Why a trial failed, when tuner (not the model) ended it.
INTERRUPTED = "interrupted"  # given back on SIGTERM/Ctrl-C: its parameters run again
