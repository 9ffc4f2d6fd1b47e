"""The validated study file of `harness sweep`: objectives, sampler, pruner, base config and search space.

A bad file raises ConfigError naming the file (or the flag), the dotted key and the problem, before any
store is opened."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from harness.config import (
    Frozen,
    TrainConfig,
    blame_override,
    build_train_config,
    parse_override,
    read_yaml_mapping,
    set_dotted,
    set_train_key,
    train_keys,
    validation_problem,
)
from harness.errors import ConfigError
from harness.metric_names import is_logged, known_names
from harness.urls import absolute_url, display_url, missing_driver

if TYPE_CHECKING:
    import optuna

DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
# Where a study runs, not what it computes: may change when a study is resumed.
PLACEMENT: dict[str, bool | set[str]] = {"device": True, "data": {"root", "download"}}  # a model_dump exclude

Scalar = bool | int | float | str
Aggregate = Literal["mean", "median", "min"]


class FloatSpace(Frozen):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> FloatSpace:
        check_bounds(self.low, self.high, self.log, self.step)
        return self

    def suggest(self, trial: optuna.Trial, key: str) -> float:
        """The trial's value for `key`."""
        return trial.suggest_float(key, self.low, self.high, log=self.log, step=self.step)

    def describe(self) -> str:
        """`float [0.1, 4.0] log`, `float [0.0, 1.0] step 0.25`."""
        return (
            f"float [{self.low}, {self.high}]"
            + (" log" if self.log else "")
            + (f" step {self.step}" if self.step else "")
        )

    def bounds(self) -> dict[str, float]:
        """The values at its ends, by the study-file key that sets each."""
        return {"low": self.low, "high": self.high}

    def grid(self) -> tuple[float, ...] | None:
        """Every value a grid sampler visits, or None without a step."""
        if self.step is None:
            return None
        count = round((self.high - self.low) / self.step) + 1
        return tuple(round(self.low + i * self.step, 12) for i in range(count))


class IntSpace(Frozen):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> IntSpace:
        check_bounds(self.low, self.high, self.log, None if self.step == 1 else self.step)
        return self

    def suggest(self, trial: optuna.Trial, key: str) -> int:
        """The trial's value for `key`."""
        return trial.suggest_int(key, self.low, self.high, log=self.log, step=self.step)

    def describe(self) -> str:
        """`int [0, 8]`, `int [0, 8] step 2`, `int [1, 64] log`."""
        return (
            f"int [{self.low}, {self.high}]"
            + (" log" if self.log else "")
            + (f" step {self.step}" if self.step != 1 else "")
        )

    def bounds(self) -> dict[str, int]:
        """The values at its ends, by the study-file key that sets each."""
        return {"low": self.low, "high": self.high}

    def grid(self) -> tuple[int, ...]:
        return tuple(range(self.low, self.high + 1, self.step))


class CategoricalSpace(Frozen):
    """Choices are scalars or lists of scalars (e.g. `codes.categorical: [[10], [10, 10]]`);
    Optuna stores lists as JSON strings."""

    type: Literal["categorical"]
    choices: tuple[Scalar | tuple[Scalar, ...], ...] = Field(min_length=1)

    @field_validator("choices", mode="before")
    @classmethod
    def _lists_are_fine(cls, value: Any) -> Any:
        if isinstance(value, list):
            return tuple(tuple(choice) if isinstance(choice, list) else choice for choice in value)
        return value

    @model_validator(mode="after")
    def _distinct(self) -> CategoricalSpace:
        if len(set(self.optuna_choices())) != len(self.choices):
            raise ValueError("choices repeat a value")
        return self

    @property
    def encoded(self) -> bool:
        return any(isinstance(choice, tuple) for choice in self.choices)

    def optuna_choices(self) -> tuple[Scalar, ...]:
        """The choices as Optuna stores them: lists become JSON strings."""
        if not self.encoded:
            return tuple(self.choices)  # type: ignore[arg-type]
        return tuple(json.dumps(list(c) if isinstance(c, tuple) else c) for c in self.choices)

    def decode(self, value: Any) -> Any:
        """An Optuna value back to the train config's value."""
        return json.loads(value) if self.encoded and isinstance(value, str) else value

    def suggest(self, trial: optuna.Trial, key: str) -> Any:
        """The trial's value for `key`, as the train config takes it."""
        return self.decode(trial.suggest_categorical(key, self.optuna_choices()))

    def describe(self) -> str:
        """`categorical [...]`, as Optuna stores the choices."""
        return f"categorical {list(self.optuna_choices())}"

    def bounds(self) -> dict[str, Any]:
        """Every choice, by the study-file key that sets it (`choices[1]`)."""
        return {f"choices[{i}]": self.decode(c) for i, c in enumerate(self.optuna_choices())}

    def grid(self) -> tuple[Scalar, ...]:
        return self.optuna_choices()


Space = Annotated[FloatSpace | IntSpace | CategoricalSpace, Field(discriminator="type")]


def check_bounds(low: float, high: float, log: bool, step: float | None) -> None:
    """Bounds Optuna accepts: low < high, log needs low > 0 and no step, whole steps from low to high."""
    if not low < high:
        raise ValueError(f"low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise ValueError(f"log needs low > 0, got {low}")
    if log and step is not None:
        raise ValueError("log and step cannot be combined")
    if step is not None:
        count = (high - low) / step
        if not math.isclose(count, round(count), abs_tol=1e-9):
            raise ValueError(f"high - low ({high - low}) must be a multiple of step ({step})")


class Objective(Frozen):
    metric: str
    direction: Literal["maximize", "minimize"]

    @field_validator("metric")
    @classmethod
    def _logged(cls, value: str) -> str:
        if not is_logged(value):
            raise ValueError(f"the trainer does not log '{value}'; it logs {known_names()}")
        return value


class TpeSampler(Frozen):
    type: Literal["tpe"]
    seed: int | None = None
    n_startup_trials: int = Field(10, ge=0)
    n_ei_candidates: int = Field(24, ge=1)
    multivariate: bool = False
    group: bool = False
    constant_liar: bool = True  # running trials count as bad guesses, so parallel workers spread out


class RandomSampler(Frozen):
    type: Literal["random"]
    seed: int | None = None


class GridSampler(Frozen):
    type: Literal["grid"]
    seed: int | None = None


class CmaesSampler(Frozen):
    type: Literal["cmaes"]
    seed: int | None = None
    n_startup_trials: int = Field(1, ge=0)
    sigma0: float | None = Field(None, gt=0)
    restart_strategy: Literal["ipop", "bipop"] | None = None
    popsize: int | None = Field(None, ge=2)
    consider_pruned_trials: bool = False
    use_separable_cma: bool = False
    with_margin: bool = False
    lr_adapt: bool = False


class GpSampler(Frozen):
    type: Literal["gp"]
    seed: int | None = None
    n_startup_trials: int = Field(10, ge=0)
    deterministic_objective: bool = False


class Nsga2Sampler(Frozen):
    type: Literal["nsga2"]
    seed: int | None = None
    population_size: int = Field(50, ge=2)
    mutation_prob: float | None = Field(None, ge=0, le=1)
    crossover_prob: float = Field(0.9, ge=0, le=1)
    swapping_prob: float = Field(0.5, ge=0, le=1)


Sampler = Annotated[
    TpeSampler | RandomSampler | GridSampler | CmaesSampler | GpSampler | Nsga2Sampler, Field(discriminator="type")
]


class MedianPruner(Frozen):
    """Steps count evaluations: step 1 is a trial's first evaluation."""

    type: Literal["median"]
    n_startup_trials: int = Field(5, ge=0)
    n_warmup_steps: int = Field(0, ge=0)
    interval_steps: int = Field(1, ge=1)
    n_min_trials: int = Field(1, ge=1)


class HyperbandPruner(Frozen):
    type: Literal["hyperband"]
    min_resource: int = Field(1, ge=1)
    max_resource: int | Literal["auto"] = "auto"
    reduction_factor: int = Field(3, ge=2)
    bootstrap_count: int = Field(0, ge=0)


class SuccessiveHalvingPruner(Frozen):
    type: Literal["successive_halving"]
    min_resource: int | Literal["auto"] = "auto"
    reduction_factor: int = Field(4, ge=2)
    min_early_stopping_rate: int = Field(0, ge=0)
    bootstrap_count: int = Field(0, ge=0)


class NoPruner(Frozen):
    type: Literal["none"]


class Heartbeat(Frozen):
    """How often a running trial records that it is alive, and after how much silence it is lost (then
    failed and retried). Where it runs, not what it computes: may change when a study is resumed."""

    interval_s: int = Field(10, ge=1)
    grace_s: int = Field(60, ge=1)

    @model_validator(mode="after")
    def _grace_spans_beats(self) -> Heartbeat:
        if self.grace_s <= self.interval_s:
            raise ValueError(
                f"grace_s ({self.grace_s}) must exceed interval_s ({self.interval_s}): "
                "a live trial would look lost between two beats"
            )
        return self


Pruner = Annotated[MedianPruner | HyperbandPruner | SuccessiveHalvingPruner | NoPruner, Field(discriminator="type")]
# pydantic puts a tagged union's tag into an error's location; the dotted key leaves it out
UNION_TAGS = {"float", "int", "categorical", "tpe", "random", "grid", "cmaes", "gp", "nsga2"}
UNION_TAGS |= {"median", "hyperband", "successive_halving", "none"}


class StudySpec(Frozen):
    """A study file: what to optimise, how to sample and prune, the base config and the search space."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)  # safe in URLs, filters, paths
    objective: Objective | None = None
    objectives: tuple[Objective, ...] | None = Field(None, min_length=1)
    trials: int = Field(gt=0)
    timeout: float | None = Field(None, gt=0)
    sampler: Sampler = TpeSampler(type="tpe")
    pruner: Pruner | None = None  # median for one objective, none for several
    storage: str | None = None
    tracking_uri: str | None = None
    train: TrainConfig = TrainConfig()
    search: dict[str, Space] = Field(
        default_factory=dict
    )  # empty: every trial trains the base config (e.g. the paper's, over repeats)
    heartbeat: Heartbeat = Heartbeat()
    repeats: int = Field(1, ge=1)  # seeds a trial trains in lockstep: train.seed, train.seed + 1, ...
    aggregate: Aggregate = "mean"  # how the seeds' values make the trial's
    pack: int | None = Field(None, ge=1)  # trials a worker trains as one fused model; None: the device's default

    @field_validator("objectives", mode="before")
    @classmethod
    def _list_is_fine(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    @model_validator(mode="after")
    def _one_objective_form(self) -> StudySpec:
        if (self.objective is None) == (self.objectives is None):
            raise ValueError("give exactly one of `objective` or `objectives`")
        metrics = [o.metric for o in self.objective_list]
        if len(set(metrics)) != len(metrics):
            raise ValueError("objectives repeat a metric")
        return self

    @property
    def objective_list(self) -> tuple[Objective, ...]:
        """The objectives, whichever form the file used."""
        return (self.objective,) if self.objective is not None else self.objectives or ()

    @property
    def storage_url(self) -> str:
        """The Optuna storage URL, which load_study_spec always resolves."""
        assert self.storage is not None, "load_study_spec fills in the storage"
        return self.storage

    @property
    def multi_objective(self) -> bool:
        """Several objectives: Optuna then keeps a Pareto front and prunes nothing."""
        return len(self.objective_list) > 1

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed study must keep: objectives, the base config (but where it runs) and the search space."""
        fingerprint: dict[str, Any] = {
            "objectives": [o.model_dump() for o in self.objective_list],
            "train": self.train.model_dump(mode="json", exclude=PLACEMENT),
            "search": {key: space.model_dump(mode="json") for key, space in sorted(self.search.items())},
        }
        if self.repeats > 1:  # a study of one seed a trial keeps the fingerprint it had before repeats existed
            fingerprint |= {"repeats": self.repeats, "aggregate": self.aggregate}
        return fingerprint


def resolve_storage_url(url: str | None) -> str:
    """An Optuna storage URL, `sqlite:///mlruns/optuna.db` by default; relative SQLite paths become absolute."""
    return absolute_url(url or DEFAULT_STORAGE)


def load_study_spec(
    path: Path,
    trials: int | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    device: str | None = None,
    overrides: tuple[str, ...] = (),
) -> StudySpec:
    """Read and validate a study file; `--set KEY=VALUE` overrides and the flags beat the file. The storage
    URL comes back resolved. A problem in an override is blamed on `--set`."""
    source = str(path)
    doc = read_yaml_mapping(path)
    set_keys = []
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(doc, key, value, "--set")
        set_keys.append(key)
    if device is not None:
        build_train_config({"device": device}, "--device")  # a bad --device is the flag's fault
        set_dotted(doc, "train.device", device, "--device")
    try:
        spec = validate(doc, source)
        if trials is not None:
            spec = spec.model_copy(update={"trials": trials})
        if tracking_uri is not None:
            spec = spec.model_copy(update={"tracking_uri": tracking_uri})
        spec = spec.model_copy(update={"storage": resolve_storage_url(storage or spec.storage)})
        check_storage_url(spec.storage or "", "--storage" if storage else source)
        if spec.tracking_uri is not None:
            check_driver(spec.tracking_uri, "--tracking-uri" if tracking_uri else source, "tracking_uri")
        check_search(spec, source)
        check_sampler_and_pruner(spec, source)
    except ConfigError as err:
        raise blame_override(err, source, set_keys) from None
    return spec


def validate(doc: dict[str, Any], source: str) -> StudySpec:
    """The StudySpec of a parsed file; pydantic's first problem as a ConfigError on the dotted key."""
    try:
        return StudySpec.model_validate(doc)
    except ValidationError as err:
        problem = validation_problem(err, source)
        key = ".".join(part for part in problem.key.split(".") if part not in UNION_TAGS)
        first = err.errors()[0]
        message = problem.problem
        if first["type"] == "union_tag_not_found":
            message = "required key 'type' is missing"
        elif first["type"] == "union_tag_invalid":
            message = f"unknown type '{first['ctx']['tag']}' (expected {first['ctx']['expected_tags']})"
        raise ConfigError(source, key, message) from None


def check_storage_url(url: str, source: str) -> None:
    """A database URL whose driver is installed."""
    try:
        make_url(url)
    except ArgumentError:
        raise ConfigError(
            source, "storage", f"'{url}' is not a database URL (e.g. sqlite:///mlruns/optuna.db)"
        ) from None
    check_driver(url, source, "storage")


def check_driver(url: str, source: str, key: str) -> None:
    """The database driver a store URL needs is installed (a ConfigError naming the extra otherwise)."""
    problem = missing_driver(url)
    if problem is not None:
        raise ConfigError(source, "" if source.startswith("--") else key, f"{display_url(url)}: {problem}")


def check_search(spec: StudySpec, source: str) -> None:
    """Every search key is a train key, and every bound or choice is a value that key accepts."""
    if not spec.search and spec.trials > 1:  # every trial would train the same model
        raise ConfigError(source, "trials", "nothing is searched: a study of one trial (repeats trains more seeds)")
    known = train_keys()
    base = spec.train.model_dump()
    for key, space in spec.search.items():
        if key not in known:
            raise ConfigError(source, f"search.{key}", "not a train key")
        if key == "seed" and spec.repeats > 1:
            problem = f"cannot be searched with repeats: {spec.repeats} (each trial trains seeds seed, seed + 1, ...)"
            raise ConfigError(source, "search.seed", problem)
        for label, value in space.bounds().items():
            tree = copy.deepcopy(base)
            set_train_key(tree, key, value, source)
            try:
                build_train_config(tree, source)
            except ConfigError as err:
                raise ConfigError(source, f"search.{key}.{label}", err.problem) from None


def check_sampler_and_pruner(spec: StudySpec, source: str) -> None:
    sampler = spec.sampler
    if isinstance(sampler, GridSampler):
        size = 1
        for key, space in spec.search.items():
            points = space.grid()
            if points is None:
                raise ConfigError(source, f"search.{key}", "the grid sampler needs a step for float ranges")
            size *= len(points)
        if spec.trials > size:
            raise ConfigError(source, "trials", f"{spec.trials} trials exceed the grid's {size} points")
    if isinstance(sampler, CmaesSampler) and spec.multi_objective:
        raise ConfigError(source, "sampler.type", "cmaes optimises a single objective")
    if spec.multi_objective and spec.pruner is not None and not isinstance(spec.pruner, NoPruner):
        raise ConfigError(source, "pruner", "Optuna prunes single-objective studies only; drop it or use type: none")
