"""Configs as YAML files mapped onto the frozen dataclasses, with ``key=value`` overrides.

A YAML file starts from the defaults, from a named preset (``preset: small_cpu``: its model and
its training recipe, see ``maskrcnn.config.preset_config``) or from another file
(``base: other.yaml``, relative to this one), then sets any field::

    preset: small_cpu
    data: {train_json: data/shapes/train.json, train_images: data/shapes/train}
    solver: {base_lr: 0.02, max_minutes: 12}

Unknown keys are errors that name the key and the file, so a typo never passes silently.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from maskrcnn.config import PRESETS, Config, ConfigError, apply_overrides, from_dict, preset_config, to_dict



def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _preset(name: str, where: str) -> dict:
    if name not in PRESETS:
        raise ConfigError(f"{where}: unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return to_dict(preset_config(name))


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file (or preset; presets: {', '.join(PRESETS)})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def _resolve(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The full config dict a file describes, checked key by key against ``Config``."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' files include each other: "
                          + " -> ".join(str(p) for p in (*seen, path)))
    data = _read_yaml(path)
    base, preset = data.pop("base", None), data.pop("preset", None)
    if base is not None and preset is not None:
        raise ConfigError(f"{path}: give either 'base' or 'preset', not both (the base file may name the preset)")
    if base is not None:
        start = _resolve(path.parent / str(base), (*seen, path))
    elif preset is not None:
        start = _preset(str(preset), str(path))
    else:
        start = to_dict(Config())
    merged = _merge(start, data)
    try:
        from_dict(Config, merged)  # rejects unknown keys and wrong types, naming this file
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return merged


def load_config(source: str | Path, overrides: list[str] | tuple = ()) -> Config:
    """A ``Config`` from a YAML file or a preset name, then ``key.sub=value`` overrides.

    >>> load_config("small_cpu", ["solver.base_lr=0.01"]).solver.base_lr
    0.01
    >>> load_config("small_cpu").model.backbone.depth
    18
    """
    if str(source) in PRESETS:
        config = from_dict(Config, _preset(str(source), "preset"))
    else:
        config = from_dict(Config, _resolve(Path(source)))
    return apply_overrides(config, list(overrides))


def save_config(config: Config, path: str | Path) -> Path:
    """Write every field of ``config`` as YAML; ``load_config`` reads it back unchanged.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "c.yaml")
    >>> load_config(save_config(load_config("paper"), path)) == load_config("paper")
    True
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    return path
