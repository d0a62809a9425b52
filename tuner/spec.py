"""The study file: TOML parsed into a small typed :class:`StudySpec`.

Every mistake is reported as a :class:`~tuner.errors.UserError` that names the file and the
key (``studies/x.toml: [search] l2: ...``), so a user never sees a traceback for a typo. The
spec round-trips through JSON (:meth:`StudySpec.to_dict` / :meth:`StudySpec.from_dict`)
because it is stored inside the study: a worker on another node needs only the study name.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuner.errors import UserError

SAMPLERS = ("tpe", "random", "qmc")
PRUNERS = ("median", "trend", "percentile", "patient", "hyperband", "successive-halving",
           "none")
FAMILIES = ("mlp", "cnn")
KERAS_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100")
AUGMENT_TRANSFORMS = ("rotation", "translation", "zoom", "contrast")
_USER_FUNCTION = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")
_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# What may change when a study is resumed: the budgets, and settings that shape no search.
CHANGEABLE_FIELDS = ("n_trials", "epoch_budget", "time_budget", "trial_timeout", "keep_models")


@dataclass(frozen=True)
class Range:
    """A closed interval to sample from; ``low == high`` means a fixed value."""

    low: float
    high: float
    log: bool = False

    @property
    def fixed(self) -> bool:
        return self.low == self.high


@dataclass(frozen=True)
class DataSpec:
    source: str = "digits"
    validation_split: float = 0.2
    image_size: tuple[int, int] = (32, 32)
    limit: int | None = None
    test_split: float = 0.0  # held out for the test when the source has no test part


def source_kind(source: str) -> tuple[str, str]:
    """``"npz:/data/x.npz"`` → ``("npz", "/data/x.npz")``; ``"digits"`` → ``("digits", "")``."""
    kind, _, rest = source.partition(":")
    return kind, rest


@dataclass(frozen=True)
class ModelSpec:
    family: str = "mlp"
    epochs: int = 20
    batch_size: int = 64
    patience: int = 5
    learning_rate: float = 1e-3


@dataclass(frozen=True)
class SearchSpec:
    """The regularization knobs. ``dropout`` holds one shared range or one range per layer."""

    dropout: tuple[Range, ...] = (Range(0.0, 0.5),)
    l2: Range = Range(1e-6, 1e-2, log=True)
    augment: Range | None = None
    augment_ranges: dict[str, Range] = field(default_factory=dict)
    flip: bool = False
    learning_rate: Range | None = None

    @property
    def dropout_per_layer(self) -> bool:
        return len(self.dropout) > 1


@dataclass(frozen=True)
class StudySpec:
    name: str
    n_trials: int | None = 20
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int | None = None
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    search: SearchSpec = SearchSpec()
    epoch_budget: int | None = None  # epochs trained by the whole study, every trial counted
    time_budget: float | None = None  # seconds from the first trial; no trial starts after
    trial_timeout: float | None = None  # seconds one trial may train before it is failed
    pruner_warmup: int | None = None  # epochs before pruning; None: a quarter of the epochs
    keep_models: int | None = 5  # models of the best K trials are kept; None: every one

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict, the form stored in the study."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> StudySpec:
        search = raw["search"]
        return cls(
            name=raw["name"],
            n_trials=raw["n_trials"],
            sampler=raw["sampler"],
            pruner=raw["pruner"],
            seed=raw["seed"],
            epoch_budget=raw.get("epoch_budget"),
            time_budget=raw.get("time_budget"),
            trial_timeout=raw.get("trial_timeout"),
            pruner_warmup=raw.get("pruner_warmup"),
            keep_models=raw.get("keep_models", 5),
            data=DataSpec(**{**raw["data"], "image_size": tuple(raw["data"]["image_size"])}),
            model=ModelSpec(**raw["model"]),
            search=SearchSpec(
                dropout=tuple(Range(**r) for r in search["dropout"]),
                l2=Range(**search["l2"]),
                augment=Range(**search["augment"]) if search["augment"] else None,
                augment_ranges={k: Range(**r) for k, r in search["augment_ranges"].items()},
                flip=search["flip"],
                learning_rate=(
                    Range(**search["learning_rate"]) if search["learning_rate"] else None
                ),
            ),
        )


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study file; every problem is a one-line :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: study file not found (give the path to a .toml file, e.g. "
                        "studies/digits_demo.toml)")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (expected TOML)") from None
    return parse_spec(raw, str(path))


def parse_spec(raw: dict[str, Any], where: str = "<study>") -> StudySpec:
    """Validate an already-parsed TOML document (``where`` names it in errors)."""
    p = _Parser(where)
    p.only_keys(raw, "", {"study", "data", "model", "search"})
    study = p.table(raw, "study", required=True)
    data = p.table(raw, "data")
    model = p.table(raw, "model")
    search = p.table(raw, "search")
    p.only_keys(study, "study", {"name", "n_trials", "epoch_budget", "time_budget",
                                 "trial_timeout", "sampler", "pruner", "pruner_warmup",
                                 "keep_models", "seed"})
    p.only_keys(data, "data", {"source", "validation_split", "test_split", "image_size",
                               "limit"})
    p.only_keys(model, "model", {"family", "epochs", "batch_size", "patience", "learning_rate"})
    p.only_keys(search, "search", {"dropout", "l2", "augment", "flip", "learning_rate"})

    name = p.string(study, "study", "name", required=True)
    if not _STUDY_NAME.match(name):
        p.fail("study", "name", f"{name!r} is not a valid name: use letters, digits, '-', "
               "'_' or '.', at most 128 characters")
    family = p.string(model, "model", "family", "mlp")
    if family not in FAMILIES and not _USER_FUNCTION.match(family):
        p.fail("model", "family", f"unknown model family {family!r}: use one of "
               f"{', '.join(FAMILIES)} or 'package.module:function'")
    epochs = p.integer(model, "model", "epochs", 20, minimum=1)
    epoch_budget = p.integer(study, "study", "epoch_budget", None, minimum=1)
    time_budget = p.duration(study, "study", "time_budget")
    # Without another budget a study stops after 20 trials; with one, n_trials is optional.
    default_trials = 20 if epoch_budget is None and time_budget is None else None
    pruner = p.choice(study, "study", "pruner", "median", PRUNERS)
    warmup = p.integer(study, "study", "pruner_warmup", None, minimum=0)
    if warmup is not None and warmup >= epochs - 1 and pruner != "none":
        # the first epoch a trial may be stopped at is warm-up + 1, and never the last one
        lower = f"lower it to at most {epochs - 2}" if epochs > 2 else "remove it"
        p.fail("study", "pruner_warmup", f"{warmup} epochs of warm-up in trials of {epochs} "
               "([model] epochs) leave no epoch at which to stop a trial early (never at its "
               f"last): {lower}, or set pruner = \"none\"")
    return StudySpec(
        name=name,
        n_trials=p.integer(study, "study", "n_trials", default_trials, minimum=1),
        epoch_budget=epoch_budget,
        time_budget=time_budget,
        trial_timeout=p.duration(study, "study", "trial_timeout"),
        pruner_warmup=warmup,
        keep_models=_keep_models(p, study),
        sampler=p.choice(study, "study", "sampler", "tpe", SAMPLERS),
        pruner=pruner,
        # a trial's seed is this plus its number, and NumPy's seeds stop at 2**32 - 1
        seed=p.integer(study, "study", "seed", None, minimum=0, maximum=2**31 - 1),
        data=DataSpec(
            source=_check_source(p, p.string(data, "data", "source", "digits")),
            validation_split=p.number(data, "data", "validation_split", 0.2, low=0.0, high=1.0,
                                      open_low=True, open_high=True),
            image_size=p.image_size(data),
            limit=p.integer(data, "data", "limit", None, minimum=10),
            test_split=_test_split(p, data),
        ),
        model=ModelSpec(
            family=family,
            epochs=epochs,
            batch_size=p.integer(model, "model", "batch_size", 64, minimum=1),
            patience=p.integer(model, "model", "patience", 5, minimum=1),
            learning_rate=p.number(model, "model", "learning_rate", 1e-3, low=0.0,
                                   open_low=True),
        ),
        search=_parse_search(p, search, family),
    )


def _keep_models(p: _Parser, study: dict[str, Any]) -> int | None:
    value = study.get("keep_models", 5)
    if value == "all":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        p.fail("study", "keep_models", f"expected a whole number of models to keep (0 keeps "
               f"none) or \"all\", got {value!r}")
    return value


def _test_split(p: _Parser, data: dict[str, Any]) -> float:
    test = p.number(data, "data", "test_split", 0.0, low=0.0, high=1.0, open_high=True)
    validation = data.get("validation_split", 0.2)
    if isinstance(validation, int | float) and test + validation >= 1.0:
        p.fail("data", "test_split", f"test_split {test:g} and validation_split "
               f"{validation:g} leave nothing to train on: together they must stay below 1")
    return test


def _check_source(p: _Parser, source: str) -> str:
    kind, rest = source_kind(source)
    if source == "digits":
        return source
    if kind in ("npz", "images") and rest:
        return source
    if kind == "keras" and rest in KERAS_DATASETS:
        return source
    if kind == "keras":
        p.fail("data", "source", f"unknown keras dataset {rest!r}: use one of "
               f"{', '.join('keras:' + n for n in KERAS_DATASETS)}")
    p.fail("data", "source", f"unknown data source {source!r}: use digits, npz:PATH, "
           "images:DIR or keras:NAME")
    raise AssertionError  # unreachable


_FAMILY_DROPOUT_LAYERS = {"mlp": 2, "cnn": 3}


def _parse_search(p: _Parser, search: dict[str, Any], family: str) -> SearchSpec:
    dropout_raw = search.get("dropout", [0.0, 0.5])
    if isinstance(dropout_raw, list) and dropout_raw and all(isinstance(x, list)
                                                             for x in dropout_raw):
        dropout = tuple(p.range(r, "search", f"dropout[{i}]", low=0.0, high=1.0, open_high=True)
                        for i, r in enumerate(dropout_raw))
        layers = _FAMILY_DROPOUT_LAYERS.get(family)
        if layers is not None and len(dropout) != layers:
            p.fail("search", "dropout", f"model family {family!r} has {layers} dropout layers "
                   f"but {len(dropout)} ranges were given: give {layers} ranges or one shared "
                   "range like [0.0, 0.5]")
    else:
        dropout = (p.range(dropout_raw, "search", "dropout", low=0.0, high=1.0,
                           open_high=True),)

    l2 = p.range(search.get("l2", [1e-6, 1e-2]), "search", "l2", low=0.0, log=True)

    augment: Range | None = None
    augment_ranges: dict[str, Range] = {}
    raw_aug = search.get("augment")
    if isinstance(raw_aug, dict):
        p.only_keys(raw_aug, "search.augment", set(AUGMENT_TRANSFORMS))
        augment_ranges = {k: p.range(v, "search.augment", k, low=0.0, high=1.0)
                          for k, v in raw_aug.items()}
    elif raw_aug is not None:
        augment = p.range(raw_aug, "search", "augment", low=0.0, high=1.0)

    flip = search.get("flip", False)
    if not isinstance(flip, bool):
        p.fail("search", "flip", f"expected true or false, got {flip!r}")
    lr = search.get("learning_rate")
    learning_rate = (p.range(lr, "search", "learning_rate", low=0.0, open_low=True, log=True)
                     if lr is not None else None)
    return SearchSpec(dropout=dropout, l2=l2, augment=augment, augment_ranges=augment_ranges,
                      flip=flip, learning_rate=learning_rate)


def duration_seconds(value: Any) -> float | None:
    """Seconds from a number of seconds or a string such as ``"90"``, ``"30m"``, ``"8h"``;
    ``None`` if it is neither."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value.strip())
        if match:
            return float(match[1]) * _DURATION_UNITS[match[2] or "s"]
    return None


class _Parser:
    """Typed getters that raise one-line errors naming the file, table and key."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, table: str, key: str, message: str) -> None:
        location = f"[{table}] {key}" if table else key
        raise UserError(f"{self.where}: {location}: {message}")

    def only_keys(self, raw: dict[str, Any], table: str, allowed: set[str]) -> None:
        for key in raw:
            if key not in allowed:
                what = "table" if not table else "key"
                self.fail(table, key, f"unknown {what}; allowed: {', '.join(sorted(allowed))}")

    def table(self, raw: dict[str, Any], name: str, required: bool = False) -> dict[str, Any]:
        value = raw.get(name)
        if value is None:
            if required:
                raise UserError(f"{self.where}: missing [{name}] table")
            return {}
        if not isinstance(value, dict):
            raise UserError(f"{self.where}: {name} must be a [{name}] table")
        return value

    def string(self, raw: dict, table: str, key: str, default: str | None = None,
               required: bool = False) -> str:
        if key not in raw:
            if required:
                self.fail(table, key, "missing (required)")
            return default  # type: ignore[return-value]
        value = raw[key]
        if not isinstance(value, str) or not value:
            self.fail(table, key, f"expected a non-empty string, got {value!r}")
        return value

    def choice(self, raw: dict, table: str, key: str, default: str,
               choices: tuple[str, ...]) -> str:
        value = self.string(raw, table, key, default)
        if value not in choices:
            self.fail(table, key, f"unknown {key} {value!r}: use one of {', '.join(choices)}")
        return value

    def integer(self, raw: dict, table: str, key: str, default: int | None,
                minimum: int, maximum: int | None = None) -> int | None:
        if key not in raw:
            return default
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(table, key, f"expected a whole number, got {value!r}")
        if value < minimum:
            self.fail(table, key, f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            self.fail(table, key, f"must be at most {maximum}, got {value}")
        return value

    def number(self, raw: dict, table: str, key: str, default: float, low: float | None = None,
               high: float | None = None, open_low: bool = False,
               open_high: bool = False) -> float:
        if key not in raw:
            return default
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(table, key, f"expected a number, got {value!r}")
        self._bounds(table, key, float(value), low, high, open_low, open_high)
        return float(value)

    def duration(self, raw: dict, table: str, key: str) -> float | None:
        """Seconds, from a number of seconds or a string such as ``"90s"``, ``"30m"``, ``"8h"``."""
        if key not in raw:
            return None
        value = raw[key]
        seconds = duration_seconds(value)
        if seconds is None:
            self.fail(table, key, f"expected seconds or a duration like \"90s\", \"30m\", "
                      f"\"8h\", \"2d\", got {value!r}")
        if not math.isfinite(seconds):  # type: ignore[arg-type]
            self.fail(table, key, f"expected a finite duration, got {value!r}")
        if seconds <= 0:  # type: ignore[operator]
            self.fail(table, key, f"must be more than 0 seconds, got {value!r}")
        return seconds

    def image_size(self, data: dict) -> tuple[int, int]:
        value = data.get("image_size", [32, 32])
        if (not isinstance(value, list) or len(value) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                           for v in value)):
            self.fail("data", "image_size", f"expected [height, width], got {value!r}")
        return (value[0], value[1])

    def range(self, value: Any, table: str, key: str, low: float | None = None,
              high: float | None = None, open_high: bool = False, log: bool = False,
              open_low: bool = False) -> Range:
        """A ``[low, high]`` pair, or a single number meaning a fixed value."""
        if isinstance(value, int | float) and not isinstance(value, bool):
            self._bounds(table, key, float(value), low, high, open_low, open_high)
            return Range(float(value), float(value), log=False)
        if (not isinstance(value, list) or len(value) != 2
                or not all(isinstance(v, int | float) and not isinstance(v, bool)
                           for v in value)):
            self.fail(table, key, f"expected [low, high] or a single number, got {value!r}")
        lo, hi = float(value[0]), float(value[1])
        if lo > hi:
            self.fail(table, key, f"low {value[0]} is greater than high {value[1]}")
        for bound in (lo, hi):
            self._bounds(table, key, bound, low, high, open_low, open_high)
        if log and lo <= 0:  # where 0 is allowed, it means none of it
            self.fail(table, key, f"bounds must be > 0 on a log scale, got {value[0]} (for no "
                      f"{key} at all, give the single number 0)")
        return Range(lo, hi, log=log and lo != hi)

    def _bounds(self, table: str, key: str, value: float, low: float | None,
                high: float | None, open_low: bool, open_high: bool) -> None:
        if not math.isfinite(value):
            self.fail(table, key, f"expected a finite number, got {value}")
        if low is not None and (value < low or (open_low and value == low)):
            self.fail(table, key, f"{value} is out of range: must be {'>' if open_low else '>='}"
                      f" {low}")
        if high is not None and (value > high or (open_high and value == high)):
            self.fail(table, key, f"{value} is out of range: must be {'<' if open_high else '<='}"
                      f" {high}")
