"""Configs as data: YAML files validated against dataclass schemas.

One schema per stage, in code, with defaults; unknown keys, wrong types and impossible values
fail at start with a message that names the setting. ``--set a.b=value`` overrides (value
parsed as YAML) and CLI options are applied on top of the file. The generic loader lives here,
in the lowest layer, so that the training stages reuse it without preprocessing knowing them.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import yaml


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type, or impossible."""


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_mapping(hint, value, where)
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or hint is tuple else items
    if origin in (dict, Mapping) or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_mapping(cls: type, data: Mapping[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from ``data``, checking keys and types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}" if where != "config" else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """``data["a"]["b"] = value`` for ``"a.b"``."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
    node[keys[-1]] = value


def parse_overrides(items: Sequence[str]) -> dict:
    """``["a.b=1", "c=x,y"]`` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        set_dotted(out, key.strip(), yaml.safe_load(text) if text.strip() else "")
    return out


def deep_merge(base: dict, top: Mapping) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def load_config(cls: type, path: str | None = None, overrides: Mapping | None = None) -> Any:
    """The config of a stage: defaults <- YAML file <- overrides (``--set`` and CLI options).

    Raises:
        ConfigError: naming the file and setting at fault.
    """
    data: dict = {}
    where = "config"
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path}: not found")
        with open(path) as handle:
            try:
                data = yaml.safe_load(handle) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"config file {path}: invalid YAML ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: expected a mapping at top level")
    if overrides:
        data = deep_merge(data, overrides)
    try:
        return from_mapping(cls, data, where)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path else str(err)) from None


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def flatten(data: Mapping, prefix: str = "") -> dict:
    """Nested config -> ``{"a.b": value}`` (for MLflow params)."""
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


@dataclass
class PreprocessConfig:
    """Settings of ``medmoco preprocess`` (``configs/preprocess/rsna.yaml``)."""

    input: str = ""
    labels: str = ""
    out: str = ""
    size: int = 256
    windows: list = field(default_factory=lambda: ["brain", "subdural", "bone"])
    window_mode: str = "linear"
    workers: int = 0  # 0 = the CPUs this process may use (usable_cpus)
    # Threads per worker for a decoder that can use them (JPEG 2000: OpenJPEG decodes its
    # code-blocks in parallel). 0 = the usable CPUs the workers leave, usable_cpus() // workers: one
    # worker per CPU (the default) decodes single-threaded; a job with fewer workers than CPUs
    # (--workers 1, or fewer chunks than CPUs) lets each decode use the rest.
    decode_threads: int = 0
    files_per_shard: int = 1024
    split_fractions: dict = field(default_factory=lambda: {"unsupervised": 0.75, "train": 0.15, "val": 0.05,
                                                           "test": 0.05})
    label_fraction: float = 0.2
    seed: int = 0
    shard: str = ""  # "i/n": this job handles every n-th chunk starting at i (SLURM arrays)
    file_timeout_s: float = 30.0
    # A decode stuck where SIGALRM cannot reach (inside C code) is killed by the supervisor's
    # watchdog after 2 x file_timeout_s + watchdog_grace_s (more on slow network filesystems).
    watchdog_grace_s: float = 10.0
    hash_ids: bool = False
    hash_salt: str = ""
    # DICOM Modality values read (others go to errors.csv); [] reads every modality. CT windows on
    # MR, CR, NM or OT pixels are meaningless. A missing Modality is accepted with a note.
    modalities: list = field(default_factory=lambda: ["CT"])

    def __post_init__(self) -> None:
        from .windowing import WINDOW_MODES, parse_windows

        if not 8 <= self.size <= 2048:
            raise ConfigError(f"size {self.size}: must be within 8..2048")
        if self.window_mode not in WINDOW_MODES:
            raise ConfigError(f"window_mode {self.window_mode!r}: use one of {WINDOW_MODES}")
        try:
            parse_windows(self.windows)
        except ValueError as err:
            raise ConfigError(f"windows: {err}") from None
        if self.workers < 0:
            raise ConfigError(f"workers {self.workers}: must be >= 0 (0 = all cores)")
        if self.decode_threads < 0:
            raise ConfigError(f"decode_threads {self.decode_threads}: must be >= 0 (0 = the CPUs the workers leave)")
        if self.files_per_shard < 1:
            raise ConfigError(f"files_per_shard {self.files_per_shard}: must be >= 1")
        if not 0.0 < self.label_fraction <= 1.0:
            raise ConfigError(f"label_fraction {self.label_fraction}: must be in (0, 1]")
        from .splits import check_fractions

        try:
            check_fractions(self.split_fractions)
        except ValueError as err:
            raise ConfigError(f"split_fractions: {err}") from None
        if self.shard:
            parse_shard(self.shard)
        if self.file_timeout_s <= 0:
            raise ConfigError(f"file_timeout_s {self.file_timeout_s}: must be > 0")
        if self.watchdog_grace_s < 0:
            raise ConfigError(f"watchdog_grace_s {self.watchdog_grace_s}: must be >= 0")


def usable_cpus() -> int:
    """The CPUs this process may use: ``SLURM_CPUS_PER_TASK`` inside a SLURM task (set with ``-c``),
    else the CPU affinity mask (a cgroup or ``taskset`` limit; a SLURM task is pinned to its CPUs),
    else every core. ``os.cpu_count()`` counts the whole node: on a shared node a job started that
    many workers on the few CPUs it was given."""
    try:
        slurm = int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0)
    except ValueError:
        slurm = 0
    if slurm > 0:
        return slurm
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise ConfigError(f"shard {text!r}: expected i/n, e.g. 0/8") from None
    if not (count >= 1 and 0 <= index < count):
        raise ConfigError(f"shard {text!r}: need 0 <= i < n")
    return index, count
