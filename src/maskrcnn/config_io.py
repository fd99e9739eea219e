"""Configs as YAML files mapped onto the frozen dataclasses, with ``key=value`` overrides.

A YAML file may start from a named model preset (``preset: small_cpu``) and then set any field::

    preset: small_cpu
    model: {roi_heads: {num_classes: 3}}
    solver: {base_lr: 0.02, max_minutes: 12}
"""

from __future__ import annotations

from pathlib import Path

import yaml

from maskrcnn.config import PRESETS, Config, ConfigError, apply_overrides, from_dict, to_dict


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(source: str | Path, overrides: list[str] | tuple = ()) -> Config:
    """A ``Config`` from a YAML file or a preset name, then overrides.

    >>> load_config("small_cpu", ["solver.base_lr=0.01"]).solver.base_lr
    0.01
    """
    if str(source) in PRESETS:
        config = Config(model=PRESETS[str(source)]())
        return apply_overrides(config, list(overrides))
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file (or preset; presets: {', '.join(PRESETS)})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys")
    preset = data.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"{path}: unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    base = to_dict(Config(model=PRESETS[preset]()) if preset else Config())
    try:
        config = from_dict(Config, _merge(base, data))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return apply_overrides(config, list(overrides))


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
