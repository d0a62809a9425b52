"""The study files shipped in studies/ stay valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuner.spec import load_spec

STUDIES = sorted((Path(__file__).resolve().parents[1] / "studies").glob("*.toml"))


@pytest.mark.parametrize("path", STUDIES, ids=[p.name for p in STUDIES])
def test_shipped_study_parses(path: Path) -> None:
    spec = load_spec(path)
    assert spec.name and spec.n_trials >= 1


def test_the_three_promised_studies_ship() -> None:
    names = {p.name for p in STUDIES}
    assert {"digits_demo.toml", "mlp_recipe.toml", "cifar10_cnn.toml"} <= names
