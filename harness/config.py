"""Frozen, validated trainer config read from YAML, with `--set key=value` overrides."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from harness.errors import ConfigError


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads `2e-4` as a float (YAML 1.2), as users write learning rates."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$|^[-+]?\d[\d_]*\.\d*$|^[-+]?\.\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text; a syntax error becomes a one-line ConfigError."""
    try:
        return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(source, "", f"invalid YAML: {where}{problem}") from None


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping."""
    if not path.is_file():
        raise ConfigError(str(path), "", "no such file")
    doc = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    if doc is None:
        raise ConfigError(str(path), "", "the file is empty")
    if not isinstance(doc, dict):
        raise ConfigError(str(path), "", f"expected a mapping of keys, got {type(doc).__name__}")
    return doc


def validation_problem(err: ValidationError, source: str, prefix: str = "") -> ConfigError:
    """Turn pydantic's first error into a one-line ConfigError naming the dotted key."""
    first = err.errors()[0]
    key = ".".join(str(part) for part in first["loc"] if not str(part).startswith("function-"))
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "required key is missing"
    more = len(err.errors()) - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return ConfigError(source, prefix + key, message)


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataConfig(Frozen):
    dataset: Literal["mnist", "fashion-mnist"] = "mnist"
    root: str = "data"  # torchvision-style root: <root>/MNIST/raw/*-ubyte[.gz]
    download: bool = True


class CodesConfig(Frozen):
    categorical: tuple[int, ...] = (10,)  # categories per categorical code
    continuous: int = Field(2, ge=0)  # number of Unif(-1, 1) codes
    noise: int = Field(62, ge=1)  # Unif(-1, 1) noise dimensions

    @field_validator("categorical", mode="before")
    @classmethod
    def _list_is_fine(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    @field_validator("categorical")
    @classmethod
    def _at_least_two(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        for size in value:
            if size < 2:
                raise ValueError(f"a categorical code needs at least 2 categories, got {size}")
        return value


class LossConfig(Frozen):
    lambda_cat: float = Field(1.0, ge=0)
    # Paper: a smaller λ for continuous codes keeps λ·L_I on the GAN loss's scale; with a
    # learned std the Gaussian NLL sharpens as Q grows confident, so 0.1 bounds its pull.
    lambda_con: float = Field(0.1, ge=0)
    continuous_std: Literal["learned", "fixed"] = "learned"
    # Instance noise (Sønderby et al. 2017): the std of Gaussian noise on D's real and fake inputs at step 1,
    # annealed linearly to 0 at the last step; it keeps an early-winning D from starving G of gradient.
    instance_noise: float = Field(0.0, ge=0)


class OptimConfig(Frozen):
    lr_d: float = Field(2e-4, gt=0)
    lr_g: float = Field(1e-3, gt=0)
    beta1: float = Field(0.5, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    batch_size: int = Field(128, ge=2)  # BatchNorm needs two or more
    # Q's head steps with D's Adam in D's step (official code), with G's in G's step, or with an Adam of its
    # own (lr_q, q_beta1, q_beta2) in G's step (the Morpho-MNIST InfoGAN: 1e-3, (0.5, 0.99)).
    q_optimizer: Literal["d", "g", "own"] = "d"
    lr_q: float = Field(1e-3, gt=0)  # q_optimizer own only
    q_beta1: float = Field(0.5, ge=0, lt=1)
    q_beta2: float = Field(0.99, ge=0, lt=1)


class ModelConfig(Frozen):
    # Spectral normalisation (Miyato et al. 2018) of every weight of D's layers (d: the trunk and D's head) or
    # of D's and Q's (dq: InfoGAN-CR); BatchNorm stays where Table 1 has it.
    spectral_norm: Literal["none", "d", "dq"] = "none"


class TrainConfig(Frozen):
    data: DataConfig = DataConfig()
    codes: CodesConfig = CodesConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    steps: int = Field(5000, gt=0)  # D+G updates; the official MNIST run
    eval_every: int = Field(500, gt=0)
    log_every: int = Field(25, gt=0)
    # Steps between checkpoints (what a stopped run goes on from): null, at each evaluation; 0, none.
    checkpoint_every: int | None = Field(None, ge=0)
    seed: int = Field(0, ge=0)
    device: str = "auto"

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"optim": {"lr_d": 1}}` -> `{"optim.lr_d": 1}`; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def train_keys() -> set[str]:
    """Every dotted key of the trainer config."""
    return set(flatten(TrainConfig().model_dump()))


def set_dotted(tree: dict[str, Any], key: str, value: Any, source: str) -> None:
    """Set `a.b.c` in nested dicts, making the mappings on the way. A key of the tree that holds dots
    itself (a study file's search key `loss.lambda_cat`) is matched whole: `search.loss.lambda_cat.high`."""
    node, parts = tree, key.split(".")
    while len(parts) > 1:
        taken = next((n for n in range(len(parts) - 1, 0, -1) if ".".join(parts[:n]) in node), 1)
        head, parts = ".".join(parts[:taken]), parts[taken:]
        child = node.setdefault(head, {})
        if child is None:
            child = node[head] = {}
        if not isinstance(child, dict):
            raise ConfigError(source, key, f"'{head}' is not a mapping")
        node = child
    node[parts[0]] = value


def set_train_key(tree: dict[str, Any], key: str, value: Any, source: str) -> None:
    """Set a dotted key of a trainer config tree, refusing keys the trainer does not have."""
    keys = train_keys()
    if key not in keys:
        section = any(k.startswith(key + ".") for k in keys)
        raise ConfigError(source, key, "is a section: set one of its keys" if section else "unknown key")
    set_dotted(tree, key, value, source)


def blame_override(err: ConfigError, source: str, overridden: Iterable[str], prefix: str = "") -> ConfigError:
    """`err` blamed on `--set` when it is about a key of `source` that an override set (or a key above or
    below one); else `err` as it is. `prefix` is what the error's key has and the overrides' keys lack."""
    key = err.key.removeprefix(prefix)
    related = (k for k in overridden if key == k or key.startswith(f"{k}.") or k.startswith(f"{key}."))
    if err.source == source and key and any(related):
        return ConfigError("--set", key, err.problem)
    return err


def parse_override(text: str) -> tuple[str, Any]:
    """`optim.lr_d=2e-4` -> ("optim.lr_d", 0.0002); the value is a YAML scalar."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError("--set", text, "expected KEY=VALUE")
    return key.strip(), parse_yaml(raw, f"--set {key.strip()}")


def build_train_config(tree: Mapping[str, Any], source: str, key_prefix: str = "") -> TrainConfig:
    """Validate a nested mapping into a TrainConfig, or raise ConfigError."""
    try:
        return TrainConfig.model_validate(dict(tree))
    except ValidationError as err:
        raise validation_problem(err, source, key_prefix) from None


def load_train_config(path: Path | None = None, overrides: tuple[str, ...] = ()) -> TrainConfig:
    """A bare train config or the `train:` section of a study file, then `--set` overrides."""
    tree: dict[str, Any] = {}
    source, prefix = "defaults", ""
    if path is not None:
        doc = read_yaml_mapping(path)
        source = str(path)
        if "train" in doc and not set(doc) & {"data", "codes", "model", "loss", "optim", "steps"}:
            tree, prefix = dict(doc["train"] or {}), "train."
        else:
            tree = doc
    overridden: set[str] = set()
    for text in overrides:
        key, value = parse_override(text)
        set_train_key(tree, key, value, "--set")
        overridden.add(key)
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as err:
        raise blame_override(validation_problem(err, source, prefix), source, overridden, prefix) from None
