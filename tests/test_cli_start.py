"""The CLI starts light: `harness --help`, `sweep --help`, `report`, `ui` and `server` import neither torch nor
torchvision, which train and evaluate; each command runs as a user runs it, in a fresh interpreter that says at
exit which of the two it imported. `train`, which trains, is the control: there the probe must see torch."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.distributions import FloatDistribution

from harness import tracking
from tests.sweep_helpers import LAMBDA_SEARCH, write_study
from tests.test_ui import clean_env, free_port

HEAVY = ("torch", "torchvision")
PROBE = f"""
import atexit, sys
atexit.register(lambda: print("heavy:", sorted({{m.split(".")[0] for m in sys.modules}} & {set(HEAVY)!r}), flush=True))
from harness.cli import main
main(sys.argv[1:], prog_name="harness")
"""
SERVE_TIMEOUT_S = 60  # for the server to stop


def heavy_modules(output: str) -> list[str]:
    """What the probe printed at exit: the heavy packages the command imported."""
    match = re.search(r"^heavy: \[(.*)\]$", output, re.MULTILINE)
    assert match, f"the probe printed nothing at exit:\n{output}"
    return re.findall(r"'(\w+)'", match.group(1))


def run_probe(args: list[str], cwd: Path) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        check=False,
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result.returncode, result.stdout + result.stderr


def a_study(folder: Path) -> list[str]:
    """A real study of two trials in real stores (no training needed to report it): the `report` arguments."""
    study_file = write_study(folder, "light", 2, LAMBDA_SEARCH)
    storage, tracking_uri = f"sqlite:///{folder / 'optuna.db'}", f"sqlite:///{folder / 'mlflow.db'}"
    study = optuna.create_study(study_name="light", storage=storage, direction="maximize")
    client = tracking.client_for(tracking_uri)
    for number, (value, lam) in enumerate([(0.4, 0.7), (0.6, 1.3)]):
        run_id = tracking.start_trial_run(client, "light", "", number, {})
        tracking.log_metrics(client, run_id, 4, {"eval/cat_acc": value})
        trial = optuna.trial.create_trial(
            params={"loss.lambda_cat": lam},
            distributions={"loss.lambda_cat": FloatDistribution(0.5, 2.0, log=True)},
            value=value,
            user_attrs={"mlflow_run_id": run_id},
        )
        study.add_trial(trial)
    return [str(study_file), "--storage", storage, "--tracking-uri", tracking_uri]


@pytest.mark.parametrize("args", [["--help"], ["sweep", "--help"], ["report", "--help"]], ids=" ".join)
def test_help_imports_no_torch(tmp_path: Path, args: list[str]) -> None:
    code, output = run_probe(args, tmp_path)
    assert code == 0, output
    assert heavy_modules(output) == [], output


@pytest.mark.slow
def test_report_imports_no_torch(tmp_path: Path) -> None:
    code, output = run_probe(["report", *a_study(tmp_path), "-o", "light.csv", "--plots", "plots"], tmp_path)
    assert code == 0, output
    assert "wrote 2 trials" in output and (tmp_path / "plots" / "curves.png").is_file(), output
    assert heavy_modules(output) == [], output


def test_train_imports_torch_so_the_probe_sees_it(tmp_path: Path) -> None:
    """The control; torchvision, which only downloads data, is not among what training imports."""
    code, output = run_probe(["train", "--set", "steps=0"], tmp_path)  # refused (steps > 0) once its imports ran
    assert code == 2 and "steps" in output, output
    assert heavy_modules(output) == ["torch"], output


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "ready"), [("ui", r"MLflow UI over .* at http"), ("server", r"workers: harness sweep")], ids=str
)
def test_serving_imports_no_torch(tmp_path: Path, command: str, ready: str) -> None:
    args = [command, "--port", str(free_port())]
    if command == "server":
        args += ["--store", f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts", str(tmp_path / "artifacts")]
    else:
        args += ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    process = subprocess.Popen(
        [sys.executable, "-c", PROBE, *args], cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    try:
        seen = []
        for line in process.stdout:  # until the command says it serves, or exits
            seen.append(line)
            if re.search(ready, line):
                break
        assert process.poll() is None, f"harness {command} exited with {process.returncode}:\n{''.join(seen)}"
        process.send_signal(signal.SIGTERM)
        output = "".join(seen) + process.stdout.read()
        assert process.wait(timeout=SERVE_TIMEOUT_S) == 0, output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert heavy_modules(output) == [], output
    assert MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()  # it served the real store
