"""YAML configs validated against dataclass schemas (OmegaConf), with ``key=value`` overrides.

Each command declares its settings once, as a dataclass whose defaults are documented in place
(the detectron2 ``defaults.py`` habit). A YAML file may start from another with ``base: other.yaml``
(path relative to the file). Unknown keys and values of the wrong type are ``ConfigError`` naming
the full key, never silently ignored.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cgh.errors import CghError
from cgh.io import atomic_write_text

T = TypeVar("T")

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(CghError):
    """A config file or override is invalid; the message names the key."""


def resolve_config_path(path: str | os.PathLike) -> Path:
    """Accept an existing path, or a name relative to the project's ``configs/`` folder."""
    p = Path(path)
    if p.is_file():
        return p
    for candidate in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file not found: {path} (also looked in {CONFIG_DIR})")


def _read_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[DictConfig]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config 'base' chain loops back to {path}")
    try:
        layer = OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors
        raise ConfigError(f"cannot parse config {path}: {e}") from e
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"config {path} must be a mapping at top level")
    base = layer.pop("base", None)
    layers = []
    if base is not None:
        base_path = path.parent / str(base)
        if not base_path.is_file():
            base_path = resolve_config_path(str(base))
        layers = _read_layers(base_path, seen + (path,))
    return layers + [layer]


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or getattr(e, "key", None)
    msg = str(getattr(e, "msg", None) or e).splitlines()[0]
    return f"config key '{key}': {msg}" if key else f"config error: {msg}"


def load_config(schema: type[T], path: str | os.PathLike | None = None,
                overrides: Sequence[str] = ()) -> T:
    """Merge ``schema`` defaults <- YAML file (with its ``base`` chain) <- ``key=value`` overrides.

    Returns an OmegaConf object typed as the schema (attribute access, struct mode).
    """
    cfg = OmegaConf.structured(schema)
    try:
        if path is not None:
            for layer in _read_layers(resolve_config_path(path)):
                cfg = OmegaConf.merge(cfg, layer)
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got: {' '.join(bad)}")
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"config key '{missing[0]}' is required but has no value"
                              + (f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else ""))
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e)) from None
    OmegaConf.set_readonly(cfg, False)
    return cfg  # type: ignore[return-value]


def to_dict(cfg: Any) -> dict:
    """Plain, fully resolved dict of a config (for records and sidecars)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]
    return dict(cfg)


def save_config(cfg: Any, out_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Save the fully resolved config next to a run's outputs."""
    path = Path(out_dir) / name
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)), resolve=True))
    return path
