"""Take the winner into production: the best trial's best-epoch model as a ``.keras`` file.

Every completed trial among the study's best ``keep_models`` uploaded its best-epoch model as
an Optuna artifact (see :func:`tuner.trial.save_model`), so exporting is a download, not a
retrain. No TensorFlow is needed here: the file is copied as stored.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import optuna
from optuna.artifacts.exceptions import ArtifactNotFound

from tuner import attrs, render
from tuner.errors import RuntimeFailure, UserError
from tuner.settings import artifacts_dir


def export_best_model(study: optuna.Study, path: str | os.PathLike[str],
                      artifacts_override: str | None = None,
                      trial: optuna.trial.FrozenTrial | None = None) -> Path:
    """Write the winner's saved model to ``path`` (a ``.keras`` file or a directory).
    ``trial``: :func:`chosen_trial`, when the caller has it already.

    The winner is the best trial or, once a confirm step has run, the run with the lowest
    validation loss, among those whose model is kept, of the confirmed winning configuration.
    An existing file is replaced atomically; a half-written file is never left behind.
    """
    best = trial or chosen_trial(study)
    dest = Path(path).expanduser()
    if dest.is_dir():
        dest = dest / f"{study.study_name}-trial{best.number}.keras"
    if dest.suffix != ".keras":
        raise UserError(f"--export-model {path}: give a file name ending in .keras (Keras "
                        "reads the format from the extension) or a folder that exists")
    artifact_id = best.user_attrs.get(attrs.MODEL_ARTIFACT)
    retrain = (f"`tuner confirm --study {study.study_name} --top 1 --seeds 1` retrains its "
               "configuration, and a confirm run always keeps its model")
    if not artifact_id and (study.user_attrs.get(attrs.SPEC) or {}).get("keep_models") == 0:
        raise UserError(f"study {study.study_name!r} keeps no models ([study] keep_models = 0):"
                        " set keep_models to 1 or more in the study file and run `tuner "
                        f"create` with it (the next trials that reach the best keep theirs), "
                        f"or {retrain}")
    if not artifact_id:
        raise RuntimeFailure(f"best trial #{best.number} of study {study.study_name!r} has no "
                             "saved model: none was kept when it finished (keep_models was 0 "
                             "then, or a tuner worker did not run it); a trial that beats it "
                             f"will keep its model, or {retrain}")
    store_dir = artifacts_dir(artifacts_override, study.user_attrs.get(attrs.ARTIFACTS))
    missing = (f"the saved model of best trial #{best.number} (artifact {artifact_id}) is "
               f"missing: looked in {store_dir.resolve()}")
    if not store_dir.is_dir():
        raise RuntimeFailure(f"{missing}, which does not exist; pass --artifacts DIR if the "
                             "models were moved")
    store = optuna.artifacts.FileSystemArtifactStore(str(store_dir))
    partial = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)  # `--export-model models/best.keras`
        optuna.artifacts.download_artifact(artifact_store=store, file_path=str(partial),
                                           artifact_id=artifact_id)
        os.replace(partial, dest)
    except ArtifactNotFound:
        raise RuntimeFailure(f"{missing}; was it deleted? pass --artifacts DIR if the models "
                             "were moved") from None
    except OSError as exc:
        raise RuntimeFailure(f"cannot write {dest}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):  # e.g. its folder is a file: nothing to clean
            partial.unlink(missing_ok=True)
    return dest.resolve()


def chosen_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The trial whose model an export writes: the confirmed winner's best run that kept its
    model, once a confirm step has run; else the best trial."""
    from tuner.confirm import ranking, winner

    try:
        best = study.best_trial
    except ValueError:
        raise RuntimeFailure(render.no_completed_trial(study.study_name, "export", [
            t.state.name for t in study.get_trials(deepcopy=False)])) from None
    confirmed = winner(ranking(study) or [])
    if confirmed is None:
        return best
    runs = {t.number: t for t in study.get_trials(deepcopy=False)}
    # its search trial's model may have fallen out of the best K; the confirm runs keep theirs
    candidates = [runs[n] for n in confirmed.runs]
    kept = [t for t in candidates if t.user_attrs.get(attrs.MODEL_ARTIFACT)]
    return min(kept or candidates, key=lambda t: (t.value, t.number))
