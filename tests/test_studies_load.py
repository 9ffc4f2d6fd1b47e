"""Every study in `studies/` is a valid study file."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.sweep.spec import GridSampler, load_study_spec

STUDIES = sorted((Path(__file__).resolve().parents[1] / "studies").glob("*.yaml"))


def test_the_issue_names_are_all_there() -> None:
    assert {path.stem for path in STUDIES} >= {"lambda", "codes", "lr", "paper", "smoke", "continuous"}


@pytest.mark.parametrize("path", STUDIES, ids=[path.stem for path in STUDIES])
def test_a_study_file_loads(path: Path) -> None:
    spec = load_study_spec(path)
    assert spec.name == path.stem, "the study's name is its file's"
    if isinstance(spec.sampler, GridSampler):
        assert spec.pruner is not None and spec.pruner.type == "none", "a grid study runs every point to the end"
