"""Which trained models are kept: the best few, not every trial's.

A CIFAR-sized CNN is several MB; a study of 10,000 trials that kept every model would fill
tens of GB that nobody loads. ``[study] keep_models = K``: a completed trial's model is saved
only if it is among the best K at that moment (:meth:`Retention.qualifies`), and models that
fall out of the best K are deleted from the artifact store and from their trial's record
(:meth:`Retention.prune`, under the study's ``models`` lock), as are the models of trials that
failed after recording theirs (a worker stopped or judged dead before its tell). A model is
recorded before its file is written, so no file outlives every record of it. At any moment at
most K models of finished trials exist, plus one per worker whose trial qualified and is being
told, and the best trial's model is never deleted (it is always among the best K). The runs of
a confirm step keep their models outside the K: the confirmed winner is exported from one of
them.
"""

from __future__ import annotations

import logging

import optuna
from optuna.artifacts.exceptions import ArtifactNotFound

from tuner import attrs, optuna_sql
from tuner.budget import Claimer, study_lock
from tuner.storage import retry_on_disconnect

DEFAULT_KEEP = 5
_log = logging.getLogger(__name__)


class Retention:
    """The best-K rule for one worker's study. ``keep=None`` keeps every model."""

    def __init__(self, claimer: Claimer, store: optuna.artifacts.FileSystemArtifactStore,
                 keep: int | None) -> None:
        self.claimer, self.store, self.keep = claimer, store, keep
        # Whether this worker saved a model since it last pruned; at first, yes: the study's
        # K may have been lowered since the models there were saved.
        self._saved = True

    def follow(self, keep: int | None) -> None:
        """Take the study's ``keep_models`` as read at a claim: a user may change it under
        running workers, as a budget. A new K is applied at this worker's next prune."""
        if keep != self.keep:
            self.keep, self._saved = keep, True

    def qualifies(self, value: float) -> bool:
        """Whether a trial that just reached ``value`` is among the best K."""
        if self.keep is None:
            return True
        if self.keep == 0:
            return False
        kept = retry_on_disconnect(self.claimer.storage, self._kept)
        if len(kept) < self.keep or value < kept[self.keep - 1][2]:
            self._saved = True
            return True
        return False

    def prune(self) -> int:
        """Delete the models beyond the best K, and those of failed trials; how many went.
        Only after this worker saved one: every worker prunes after its own saves, so the K
        hold without the others'."""
        if self.keep is None or not self._saved:
            return 0
        self._saved = False
        storage = self.claimer.storage
        # a lock of its own: deleting files never holds up a worker's claim
        with study_lock(storage, self.claimer.study.study_name, "models"):
            extra = [(trial_id, artifact_id) for trial_id, _, _, artifact_id
                     in retry_on_disconnect(storage, self._kept)[self.keep:]]
            extra += retry_on_disconnect(storage, self._failed)
            for trial_id, artifact_id in extra:
                self._delete(trial_id, artifact_id)
        return len(extra)

    def drop(self, trial_id: int, artifact_id: str | None) -> None:
        """Delete the model this worker's trial recorded, when the trial then did not complete
        (stopped, failed, or judged dead while this worker stalled): the file may have been
        written after another worker's :meth:`prune` cleared the record."""
        if artifact_id:
            self._delete(trial_id, artifact_id)

    def clear_failed(self) -> int:
        """Delete the models of failed trials (a worker killed between recording a model and
        its tell); a worker does this when it stops, so the last one leaves none behind."""
        if self.keep is None:
            return 0
        failed = retry_on_disconnect(self.claimer.storage, self._failed)
        for trial_id, artifact_id in failed:
            self._delete(trial_id, artifact_id)
        return len(failed)

    def _delete(self, trial_id: int, artifact_id: str) -> None:
        try:
            self.store.remove(artifact_id)
        except ArtifactNotFound:
            pass  # deleted by hand, by another worker a moment ago, or never written
        except OSError as exc:
            # A read-only or vanished artifact directory (an NFS remount): training goes on,
            # and the record stays, so a later prune deletes the file once it can.
            _log.warning("could not delete model %s (%s); it is kept for now", artifact_id,
                         exc.strerror or exc)
            return

        def forget() -> None:
            with self.claimer.storage.engine.begin() as conn:
                optuna_sql.forget_model(conn, trial_id, attrs.MODEL_ARTIFACT, artifact_id)

        retry_on_disconnect(self.claimer.storage, forget)

    def _failed(self) -> list[tuple[int, str]]:
        """Models recorded by trials that then failed (stopped, or judged dead, before the
        tell): never exported, and outside the K."""
        with self.claimer.storage.engine.connect() as conn:
            return optuna_sql.failed_models(conn, self.claimer.study_id, attrs.MODEL_ARTIFACT)

    def _kept(self) -> list[tuple[int, int, float, str]]:
        """The finished trials with a saved model that compete for the K places."""
        with self.claimer.storage.engine.connect() as conn:
            kept = optuna_sql.kept_models(conn, self.claimer.study_id, attrs.MODEL_ARTIFACT)
            confirming = optuna_sql.system_attr_trials(conn, self.claimer.study_id,
                                                       attrs.CONFIRMS)
        return [k for k in kept if k[0] not in confirming]
