"""The study file: what parses, what it means, and the one-line errors for what doesn't."""

from __future__ import annotations

import pytest

from tuner.errors import UserError
from tuner.spec import Range, StudySpec, load_spec, parse_spec


def minimal(**tables: dict) -> dict:
    raw = {"study": {"name": "s"}}
    raw.update(tables)
    return raw


def test_defaults_are_a_working_study() -> None:
    spec = parse_spec(minimal())
    assert spec.sampler == "tpe" and spec.pruner == "median"
    assert spec.data.source == "digits" and spec.model.family == "mlp"
    assert spec.search.l2.log and spec.search.l2.low > 0


def test_full_file(tmp_path) -> None:
    path = tmp_path / "s.toml"
    path.write_text("""
[study]
name = "cifar-cnn"
n_trials = 40
sampler = "qmc"
pruner = "hyperband"
seed = 3
[data]
source = "npz:data.npz"
validation_split = 0.1
[model]
family = "cnn"
epochs = 30
batch_size = 128
[search]
dropout = [[0.0, 0.3], [0.1, 0.5], [0.2, 0.6]]
l2 = [1e-6, 1e-2]
flip = true
learning_rate = [1e-4, 1e-2]
[search.augment]
rotation = [0.0, 0.1]
zoom = 0.1
""")
    spec = load_spec(path)
    assert spec.search.dropout == (Range(0.0, 0.3), Range(0.1, 0.5), Range(0.2, 0.6))
    assert spec.search.dropout_per_layer
    assert spec.search.augment is None
    assert spec.search.augment_ranges == {"rotation": Range(0.0, 0.1), "zoom": Range(0.1, 0.1)}
    assert spec.search.learning_rate == Range(1e-4, 1e-2, log=True)
    assert spec.search.flip is True


def test_single_number_is_a_fixed_value() -> None:
    spec = parse_spec(minimal(search={"l2": 0, "dropout": 0.25, "augment": 0}))
    assert spec.search.l2.fixed and spec.search.l2.low == 0.0
    assert spec.search.dropout[0] == Range(0.25, 0.25)


def test_spec_round_trips_through_json_form() -> None:
    import json

    search = {"dropout": [[0, 0.2], [0, 0.3]], "augment": {"zoom": [0, 0.2]}}
    spec = parse_spec(minimal(search=search, data={"image_size": [28, 28]}))
    again = StudySpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec


@pytest.mark.parametrize(("raw", "expected"), [
    (minimal(search={"dropuot": [0, 0.5]}), "[search] dropuot: unknown key"),
    ({"study": {"name": "s"}, "serch": {}}, "serch: unknown table"),
    (minimal(search={"l2": [1e-2, 1e-6]}), "[search] l2: low 0.01 is greater than high 1e-06"),
    (minimal(search={"dropout": [0.0, 1.0]}), "[search] dropout: 1.0 is out of range: must be < 1"),
    (minimal(search={"dropout": [-0.1, 0.5]}), "[search] dropout: -0.1 is out of range"),
    (minimal(search={"dropout": [[0, 0.5], [0, 1.2]]}), "[search] dropout[1]: 1.2 is out of range"),
    (minimal(search={"l2": [0, 1e-2]}), "[search] l2: bounds must be > 0 on a log scale"),
    (minimal(search={"learning_rate": [0, 1e-2]}), "[search] learning_rate: 0.0 is out of range: "
     "must be > 0"),  # no hint to give 0: a learning rate of 0 trains nothing
    (minimal(search={"learning_rate": 0}), "[search] learning_rate: 0.0 is out of range"),
    (minimal(search={"augment": [0, 1.5]}), "[search] augment: 1.5 is out of range"),
    (minimal(search={"augment": {"shear": [0, 1]}}), "[search.augment] shear: unknown key"),
    ({"study": {"name": "s", "sampler": "grid"}}, "[study] sampler: unknown sampler 'grid'"),
    ({"study": {"name": "s", "pruner": "wilcoxon"}}, "[study] pruner: unknown pruner 'wilcoxon'"),
    ({"study": {"name": "s", "pruner_warmup": 8}, "model": {"epochs": 8}},
     "[study] pruner_warmup: 8 epochs of warm-up in trials of 8 ([model] epochs) leave no epoch"),
    ({"study": {"name": "s", "pruner_warmup": 7}, "model": {"epochs": 8}},
     "leave no epoch at which to stop a trial early (never at its last): lower it to at most 6"),
    ({"study": {"name": "s", "pruner_warmup": 0}, "model": {"epochs": 1}},
     "1 ([model] epochs) leave no epoch at which to stop a trial early (never at its last): "
     "remove it, or set pruner = \"none\""),
    (minimal(model={"family": "resnet"}), "[model] family: unknown model family 'resnet'"),
    (minimal(data={"source": "mnist"}), "[data] source: unknown data source 'mnist'"),
    (minimal(data={"source": "keras:svhn"}), "[data] source: unknown keras dataset 'svhn'"),
    (minimal(model={"epochs": 0}), "[model] epochs: must be at least 1"),
    (minimal(model={"epochs": "ten"}), "[model] epochs: expected a whole number"),
    ({"study": {"n_trials": 3}}, "[study] name: missing (required)"),
    ({"data": {}}, "missing [study] table"),
    (minimal(model={"family": "cnn"}, search={"dropout": [[0, 0.5], [0, 0.5]]}),
     "model family 'cnn' has 3 dropout layers but 2 ranges were given"),
    (minimal(search={"flip": "yes"}), "[search] flip: expected true or false"),
    # TOML has nan and inf; each would fail every trial, far from the key that caused it
    (minimal(search={"dropout": [0.0, float("nan")]}), "[search] dropout: expected a finite"),
    (minimal(search={"l2": [1e-6, float("inf")]}), "[search] l2: expected a finite number"),
    (minimal(search={"learning_rate": float("nan")}), "[search] learning_rate: expected a fin"),
    (minimal(data={"validation_split": float("nan")}), "[data] validation_split: expected a f"),
    ({"study": {"name": "s", "time_budget": float("nan")}}, "[study] time_budget: expected a "
                                                             "finite duration"),
    ({"study": {"name": "s", "trial_timeout": float("inf")}}, "[study] trial_timeout: expected"),
    ({"study": {"name": "s", "seed": 2**40}}, "[study] seed: must be at most 2147483647"),
])
def test_bad_input_names_the_file_and_key(raw: dict, expected: str) -> None:
    with pytest.raises(UserError) as err:
        parse_spec(raw, "study.toml")
    message = str(err.value)
    assert message.startswith("study.toml: ")
    assert expected in message
    assert "\n" not in message


def test_missing_and_malformed_files(tmp_path) -> None:
    with pytest.raises(UserError, match="study file not found"):
        load_spec(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[study\nname = 1")
    with pytest.raises(UserError, match="bad.toml: not valid TOML"):
        load_spec(bad)
