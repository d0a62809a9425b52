"""The search space: :func:`sample` turns an Optuna trial and a spec into :class:`Hyperparams`.

Parameter names are stable (``dropout`` or ``dropout_0``..., ``l2``, ``augment`` or
``augment_rotation``..., ``learning_rate``) because they are what ``tuner best``, the dashboard
and the Optuna CLI show. Fixed values (a single number in the study file) are not sampled; they
are filled in from the spec so a trial's :class:`Hyperparams` is always complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from tuner.spec import AUGMENT_TRANSFORMS, Range, StudySpec

# How one augmentation strength in [0, 1] maps onto each transform's factor. At strength 1:
# rotate up to ±0.1 of a turn (36°), shift and zoom by up to 20 %, contrast by up to 50 %.
STRENGTH_SCALE = {"rotation": 0.1, "translation": 0.2, "zoom": 0.2, "contrast": 0.5}


class _Suggests(Protocol):
    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float:
        ...


@dataclass(frozen=True)
class Augmentation:
    """Per-transform factors as Keras preprocessing layers take them (0 = transform off)."""

    rotation: float = 0.0
    translation: float = 0.0
    zoom: float = 0.0
    contrast: float = 0.0
    flip: bool = False

    @classmethod
    def from_strength(cls, strength: float, flip: bool = False) -> Augmentation:
        """One strength scales every transform; flip only joins when strength > 0."""
        return cls(**{k: strength * s for k, s in STRENGTH_SCALE.items()},
                   flip=flip and strength > 0)

    @property
    def active(self) -> bool:
        return self.flip or any(getattr(self, k) > 0 for k in AUGMENT_TRANSFORMS)


@dataclass(frozen=True)
class Hyperparams:
    """Everything a model function needs; the model is a plain function of this."""

    dropout: tuple[float, ...]
    l2: float
    augmentation: Augmentation
    learning_rate: float
    input_shape: tuple[int, ...] = ()
    num_classes: int = 0

    def dropout_rate(self, layer: int) -> float:
        """Rate for dropout layer ``layer``: per-layer if the study gave ranges per layer."""
        return self.dropout[layer] if len(self.dropout) > 1 else self.dropout[0]


def sample(trial: _Suggests, spec: StudySpec) -> Hyperparams:
    """Ask ``trial`` for every searched knob of ``spec``."""
    return _resolve(spec, lambda name, r: trial.suggest_float(name, r.low, r.high, log=r.log))


def from_params(params: dict[str, Any], spec: StudySpec) -> Hyperparams:
    """Rebuild a finished trial's :class:`Hyperparams` from its stored params."""
    return _resolve(spec, lambda name, r: float(params[name]))


def param_names(spec: StudySpec) -> list[str]:
    """The names :func:`sample` suggests, in order (fixed values are not parameters)."""
    names: list[str] = []
    _resolve(spec, lambda name, r: names.append(name) or r.low)
    return names


def _resolve(spec: StudySpec, pick: Any) -> Hyperparams:
    def value(name: str, r: Range) -> float:
        return r.low if r.fixed else pick(name, r)

    s = spec.search
    if s.dropout_per_layer:
        dropout = tuple(value(f"dropout_{i}", r) for i, r in enumerate(s.dropout))
    else:
        dropout = (value("dropout", s.dropout[0]),)
    l2 = value("l2", s.l2)
    if s.augment_ranges:
        factors = {k: value(f"augment_{k}", r) for k, r in s.augment_ranges.items()}
        augmentation = Augmentation(**factors, flip=s.flip)
    elif s.augment is not None:
        augmentation = Augmentation.from_strength(value("augment", s.augment), s.flip)
    else:
        augmentation = Augmentation(flip=s.flip)
    lr = (value("learning_rate", s.learning_rate) if s.learning_rate is not None
          else spec.model.learning_rate)
    return Hyperparams(dropout=dropout, l2=l2, augmentation=augmentation, learning_rate=lr)
