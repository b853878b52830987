"""params.yaml → typed configs, in one place.

Every stage reads its sections through `load_params`; unknown keys and wrong types are an
`InputError` naming the file and the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from discriminator.config import EvaluateConfig, TrainConfig
from core.errors import InputError
from core.ranges import at_least, problem
from synthesis.config import SynthesisConfig

# the backbone halves the resolution five times; smaller images leave it nothing to see
MIN_IMAGE_SIZE = 32


@dataclass
class DemoConfig:
    out: str = "data/demo"
    size: int = field(default=256, metadata=at_least(MIN_IMAGE_SIZE))


@dataclass
class DataConfig:
    root: str = "data/demo"
    layout: str = "auto"  # auto | mvtec | mvtec_fs | mtd | folder
    category: str | None = None  # the category of a plain `uniadc prepare` (one per run)
    # the categories `dvc repro` runs, one prepare/synthesize/train/evaluate each (dvc.yaml foreach);
    # `uniadc categories` prints every category the layout finds, to paste here or pass with -S
    categories: list[str] | None = None
    anomaly_types: list[str] | None = None  # label order; sorted names when None
    k_normal: int = field(default=2, metadata=at_least(1))
    k_anomaly: int = field(default=0, metadata=at_least(0))


@dataclass
class Params:
    seed: int = 0
    image_size: int = field(default=256, metadata=at_least(MIN_IMAGE_SIZE))
    demo: DemoConfig = field(default_factory=DemoConfig)
    data: DataConfig = field(default_factory=DataConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


def load_params(path: str | Path | None = "params.yaml", overrides: dict | None = None) -> Params:
    """Read params.yaml and apply dotted-key overrides; `path=None` starts from the defaults.

    A named file that does not exist is an error, never a silent fall-back to the defaults.
    """
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise InputError("params file not found", path)
        if not path.is_file():
            raise InputError("is not a file", path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise InputError(f"not valid YAML ({exc})", path) from None
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return build_dataclass(Params, raw, None if path is None else str(path), "")


def build_dataclass(cls, data, source: str | None, where: str):
    """Build dataclass `cls` from a mapping, checking keys, scalar types and the allowed values
    declared on the fields (`core.ranges`) recursively."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"`{where or '<top>'}` must be a mapping, got {type(data).__name__}", source)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(
            f"unknown key `{_join(where, unknown[0])}` (known: {', '.join(sorted(names))})", source
        )
    for key, value in data.items():
        if hints[key] is str:  # a named choice: `true` for `auto | always | never` gets the choices, not "str"
            check_value(cls, key, value, source, _join(where, key))
    kwargs = {key: _coerce(hints[key], value, source, _join(where, key)) for key, value in data.items()}
    for f in dataclasses.fields(cls):
        if f.name in kwargs:
            check_value(cls, f.name, kwargs[f.name], source, _join(where, f.name))
    return cls(**kwargs)


def check_value(cls, name: str, value, source: str | None, where: str | None = None) -> None:
    """InputError when `value` breaks the rule declared on field `name` of dataclass `cls`;
    the CLI checks its own options (e.g. `demo-data --size`) with this too."""
    (f,) = [f for f in dataclasses.fields(cls) if f.name == name]
    complaint = problem(f.metadata, value, where or name)
    if complaint:
        raise InputError(complaint, source)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(hint, value, source: str, where: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, source, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, source, where)
    if origin is list:
        if not isinstance(value, list):
            raise InputError(f"`{where}` must be a list, got {value!r}", source)
        return [_coerce(args[0], v, source, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise InputError(f"`{where}` must be a mapping, got {value!r}", source)
        return {str(k): _coerce(args[1], v, source, f"{where}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # PyYAML reads `1e-3` (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint in (int, str, bool) and (type(value) is hint):
        return value
    if hint is typing.Any:
        return value
    raise InputError(f"`{where}` must be {getattr(hint, '__name__', hint)}, got {value!r}", source)
