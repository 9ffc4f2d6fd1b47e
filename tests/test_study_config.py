"""The study file: what it accepts, and a one-line exit-2 error, naming file and key, for anything else."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from harness.cli import main
from harness.errors import ConfigError
from harness.sweep.spec import CategoricalSpace, load_study_spec

VALID = """\
name: lambda
objective: {metric: eval/cat_acc, direction: maximize}
trials: 4
train: {steps: 10, optim: {lr_d: 1.0e-4}}
search:
  loss.lambda_cat: {type: float, low: 0.1, high: 4.0, log: true}
  codes.continuous: {type: int, low: 0, high: 4}
  optim.lr_g: {type: categorical, choices: [2.0e-4, 1.0e-3]}
"""


def edited(**changes: object) -> str:
    """The valid file with top-level keys replaced (None removes one)."""
    doc = yaml.safe_load(VALID)
    for key, value in changes.items():
        if value is None:
            doc.pop(key)
        else:
            doc[key] = value
    return yaml.safe_dump(doc, sort_keys=False)


def with_search(key: str, space: object) -> str:
    return edited(search={key: space})


def test_a_valid_file_and_its_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "lambda.yaml"
    path.write_text(VALID, encoding="utf-8")
    spec = load_study_spec(path)
    assert spec.storage == f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
    assert spec.sampler.type == "tpe" and spec.pruner is None and spec.timeout is None
    assert (spec.heartbeat.interval_s, spec.heartbeat.grace_s) == (10, 60)
    assert spec.train.steps == 10 and spec.train.optim.lr_d == 1.0e-4
    assert [o.metric for o in spec.objective_list] == ["eval/cat_acc"] and not spec.multi_objective
    spec = load_study_spec(
        path, trials=9, storage="sqlite:////elsewhere/o.db", tracking_uri="http://m:5000", device="cpu"
    )
    assert (spec.trials, spec.storage, spec.tracking_uri, spec.train.device) == (
        9,
        "sqlite:////elsewhere/o.db",
        "http://m:5000",
        "cpu",
    )
    assert not list(tmp_path.glob("mlruns*")), "loading a study file writes nothing"


def test_list_choices_reach_optuna_as_json_and_come_back_as_lists(tmp_path: Path) -> None:
    path = tmp_path / "codes.yaml"
    path.write_text(
        with_search("codes.categorical", {"type": "categorical", "choices": [[10], [10, 10]]}), encoding="utf-8"
    )
    space = load_study_spec(path).search["codes.categorical"]
    assert isinstance(space, CategoricalSpace)
    assert space.optuna_choices() == ("[10]", "[10, 10]")
    assert space.decode("[10, 10]") == [10, 10]


def test_several_objectives(tmp_path: Path) -> None:
    path = tmp_path / "multi.yaml"
    objectives = [{"metric": "eval/cat_acc", "direction": "maximize"}, {"metric": "loss/info", "direction": "minimize"}]
    path.write_text(
        edited(objective=None, objectives=objectives, sampler={"type": "nsga2", "seed": 1}), encoding="utf-8"
    )
    spec = load_study_spec(path)
    assert spec.multi_objective and [o.direction for o in spec.objective_list] == ["maximize", "minimize"]


BAD_FILES = {
    "unknown top key": (edited(trails=3), "trails", "unknown key"),
    "unknown key in objective": (
        edited(objective={"metric": "eval/cat_acc", "direction": "maximize", "goal": 1}),
        "objective.goal",
        "unknown key",
    ),
    "unknown key in a space": (
        with_search("loss.lambda_cat", {"type": "float", "low": 0.1, "high": 1, "scale": "log"}),
        "search.loss.lambda_cat.scale",
        "unknown key",
    ),
    "unknown train key": (edited(train={"optim": {"lr": 1}}), "train.optim.lr", "unknown key"),
    "search key not in train": (
        with_search("optim.lr", {"type": "float", "low": 0.1, "high": 1}),
        "search.optim.lr",
        "not a train key",
    ),
    "low not below high": (
        with_search("loss.lambda_cat", {"type": "float", "low": 2, "high": 1}),
        "search.loss.lambda_cat",
        "must be below high",
    ),
    "log with low 0": (
        with_search("loss.lambda_cat", {"type": "float", "low": 0, "high": 1, "log": True}),
        "search.loss.lambda_cat",
        "log needs low > 0",
    ),
    "int bound not an integer": (
        with_search("codes.continuous", {"type": "int", "low": 0.5, "high": 4}),
        "search.codes.continuous.low",
        "valid integer",
    ),
    "step not dividing": (
        with_search("codes.continuous", {"type": "int", "low": 0, "high": 5, "step": 2}),
        "search.codes.continuous",
        "multiple of step",
    ),
    "empty choices": (
        with_search("optim.lr_g", {"type": "categorical", "choices": []}),
        "search.optim.lr_g.choices",
        "at least 1",
    ),
    "unknown space type": (
        with_search("optim.lr_g", {"type": "uniform", "low": 0, "high": 1}),
        "search.optim.lr_g",
        "unknown type 'uniform'",
    ),
    "space without a type": (
        with_search("optim.lr_g", {"low": 0, "high": 1}),
        "search.optim.lr_g",
        "required key 'type' is missing",
    ),
    "bound the train key refuses": (
        with_search("optim.lr_d", {"type": "float", "low": -1, "high": 1}),
        "search.optim.lr_d.low",
        "greater than 0",
    ),
    "float range on an int key": (
        with_search("steps", {"type": "float", "low": 10, "high": 20}),
        "search.steps.low",
        "valid integer",
    ),
    "choice the train key refuses": (
        with_search("codes.categorical", {"type": "categorical", "choices": [10]}),
        "search.codes.categorical.choices[0]",
        "valid tuple",
    ),
    "trials not a number": (edited(trials="ten"), "trials", "valid integer"),
    "trials zero": (edited(trials=0), "trials", "greater than 0"),
    "missing trials": (edited(trials=None), "trials", "required key is missing"),
    "nothing searched, several trials": (edited(search={}), "trials", "nothing is searched: a study of one trial"),
    "bad study name": (edited(name="my study"), "name", "pattern"),
    "unknown metric": (
        edited(objective={"metric": "eval/acc", "direction": "maximize"}),
        "objective.metric",
        "does not log 'eval/acc'",
    ),
    "bad direction": (
        edited(objective={"metric": "eval/cat_acc", "direction": "up"}),
        "objective.direction",
        "'maximize' or 'minimize'",
    ),
    "both objective forms": (edited(objectives=[{"metric": "loss/d", "direction": "minimize"}]), "", "exactly one of"),
    "unknown sampler": (edited(sampler={"type": "bohb"}), "sampler", "unknown type 'bohb'"),
    "unknown sampler option": (edited(sampler={"type": "tpe", "n_startup": 3}), "sampler.n_startup", "unknown key"),
    "unknown pruner option": (edited(pruner={"type": "median", "warmup": 3}), "pruner.warmup", "unknown key"),
    "grid over a float range": (edited(sampler={"type": "grid"}), "search.loss.lambda_cat", "needs a step"),
    "more trials than grid points": (
        edited(sampler={"type": "grid"}, search={"optim.lr_g": {"type": "categorical", "choices": [1.0e-3, 2.0e-3]}}),
        "trials",
        "exceed the grid's 2 points",
    ),
    "pruner on several objectives": (
        edited(
            objective=None,
            objectives=[
                {"metric": "eval/cat_acc", "direction": "maximize"},
                {"metric": "loss/d", "direction": "minimize"},
            ],
            pruner={"type": "median"},
        ),
        "pruner",
        "single-objective studies only",
    ),
    "not a database URL": (edited(storage="not a url"), "storage", "not a database URL"),
    "a storage driver that is not installed": (
        edited(storage="postgresql+psycopg://u:secret@127.0.0.1/optuna"),
        "storage",
        "postgresql+psycopg://u:***@127.0.0.1/optuna: postgresql+psycopg:// needs the Python module 'psycopg'",
    ),
    "a tracking store driver that is not installed": (
        edited(tracking_uri="postgresql+psycopg://u@127.0.0.1/mlflow"),
        "tracking_uri",
        "pip install -e '.[postgres]'",
    ),
    "heartbeat grace within a beat": (
        edited(heartbeat={"interval_s": 10, "grace_s": 10}),
        "heartbeat",
        "grace_s (10) must exceed interval_s (10): a live trial would look lost between two beats",
    ),
    "heartbeat interval zero": (
        edited(heartbeat={"interval_s": 0}),
        "heartbeat.interval_s",
        "greater than or equal to 1",
    ),
    "a list, not a mapping": ("- name: x\n", "", "expected a mapping"),
    "YAML syntax error": ("name: [lambda\ntrials: 3\n", "", "invalid YAML: line"),
    "empty file": ("", "", "the file is empty"),
}


@pytest.mark.parametrize("text, key, problem", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_a_bad_file_is_one_line_naming_file_key_and_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, key: str, problem: str
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "study.yaml"
    path.write_text(text, encoding="utf-8")
    result = CliRunner().invoke(main, ["sweep", str(path)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith(f"error: {path}: {key}: " if key else f"error: {path}: "), lines[0]
    assert problem in lines[0], lines[0]
    assert not (tmp_path / "mlruns").exists(), "nothing written to any store"


def test_a_missing_file_and_a_bad_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    missing = CliRunner().invoke(main, ["sweep", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and missing.output == f"error: {tmp_path / 'nope.yaml'}: no such file\n"
    path = tmp_path / "study.yaml"
    path.write_text(VALID, encoding="utf-8")
    device = CliRunner().invoke(main, ["sweep", str(path), "--device", "tpu"])
    assert device.exit_code == 2 and device.output.startswith("error: --device: device: must be auto, cpu")
    storage = CliRunner().invoke(main, ["sweep", str(path), "--storage", "nowhere"])
    assert storage.exit_code == 2 and storage.output.startswith(
        "error: --storage: storage: 'nowhere' is not a database URL"
    )
    assert not (tmp_path / "mlruns").exists()


def test_a_changed_study_is_refused_before_it_mixes_with_the_stored_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from harness.sweep import storage as sweep_storage
    from harness.sweep import study as sweep_study

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "study.yaml"
    path.write_text(VALID, encoding="utf-8")
    spec = load_study_spec(path)
    sweep_storage.quiet_optuna()
    sweep_study.open_study(spec, sweep_storage.open_storage(spec.storage_url), str(path), create=True)
    path.write_text(VALID.replace("high: 4.0", "high: 8.0"), encoding="utf-8")
    changed = load_study_spec(path)
    with pytest.raises(ConfigError, match="search: differs from the study 'lambda'"):
        sweep_study.open_study(changed, sweep_storage.open_storage(spec.storage_url), str(path), create=True)
    path.write_text(VALID, encoding="utf-8")  # where it runs may change: another device resumes it
    resumed = sweep_study.open_study(
        load_study_spec(path, device="cpu"), sweep_storage.open_storage(spec.storage_url), str(path), create=False
    )
    assert resumed.study_name == "lambda"


def test_set_overrides_study_keys_and_a_bad_one_is_blamed_on_the_flag(tmp_path: Path) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(VALID, encoding="utf-8")
    sets = ("name=lambda-gpu", "train.steps=5000", "search.loss.lambda_cat.high=8", "sampler={type: random, seed: 3}")
    spec = load_study_spec(path, overrides=sets)
    assert (spec.name, spec.train.steps, spec.sampler.type, spec.sampler.seed) == ("lambda-gpu", 5000, "random", 3)
    assert spec.search["loss.lambda_cat"].model_dump()["high"] == 8.0
    for text, line in (
        ("train.steps=0", "error: --set: train.steps: Input should be greater than 0"),
        ("search.loss.lambda_cat.low=9", "error: --set: search.loss.lambda_cat: low (9.0) must be below high"),
        ("name", "error: --set: name: expected KEY=VALUE"),
    ):
        result = CliRunner().invoke(main, ["sweep", str(path), "--set", text])
        assert result.exit_code == 2 and result.output.startswith(line), result.output


def test_validating_a_study_file_does_not_import_torch() -> None:
    study = Path(__file__).resolve().parents[1] / "studies" / "lambda.yaml"
    code = "import sys; from pathlib import Path; from harness.sweep.spec import load_study_spec; "
    code += f"load_study_spec(Path({str(study)!r})); "
    code += "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
