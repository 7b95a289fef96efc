"""YAML configs validated against dataclass schemas (OmegaConf), with ``key=value`` overrides.

Each command declares its settings once, as a dataclass whose defaults are documented in place
(the detectron2 ``defaults.py`` habit). A YAML file may start from another with ``base: other.yaml``
(path relative to the file; config files are .yaml or .yml, so a stray path such as /etc/passwd is
refused unread). Unknown keys and values of the wrong type are ``ConfigError`` naming
the full key, never silently ignored.

Values are checked too: a float anywhere must be finite (``nan``/``inf`` would end up in records),
and a field declared with ``bounded(default, ge=..., gt=..., le=..., lt=...)`` must lie within its
bounds (each item, for a list; a bound may name a sibling field: ``crop`` ``le="resize"``).

YAML is read with limits (``MAX_FILE_BYTES``, ``MAX_NODES``, ``MAX_TEXT_CHARS``, ``MAX_DEPTH``)
checked on the composed node graph before anything is built, so an alias bomb ("billion laughs")
or a path to some large or foreign file is refused in milliseconds; error messages quote at most
``EXCERPT_CHARS`` of the input (a parse error gives line, column and the problem, not the text).
"""
from __future__ import annotations

import dataclasses
import math
import operator
import os
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf._utils import get_yaml_loader   # the loader OmegaConf itself uses (YAML 1.2 floats, no duplicate keys)
from omegaconf.errors import OmegaConfBaseException

from cgh.errors import CghError
from cgh.io import atomic_write_text

T = TypeVar("T")

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# Real configs are a few KB holding a few hundred values; these bound a broken or hostile input.
MAX_FILE_BYTES = 1 << 20       # one YAML file (each layer of a ``base`` chain)
MAX_NODES = 100_000            # YAML nodes once aliases are expanded (a file, or one override value)
MAX_TEXT_CHARS = 1 << 20       # scalar characters once aliases are expanded
MAX_DEPTH = 64                 # nesting of mappings / sequences
EXCERPT_CHARS = 200            # the most of any input an error message quotes

# bounded(...) keyword -> (test value against bound, how the message says it)
_BOUNDS: dict[str, tuple[Callable[[Any, Any], bool], str]] = {
    "ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<"),
}


class ConfigError(CghError):
    """A config file or override is invalid; the message names the key."""


def excerpt(value: Any) -> str:
    """``value`` as one line of at most ``EXCERPT_CHARS`` characters, for error messages."""
    text = str(value).replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "..."


def bounded(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None,
            ge: float | str | None = None, gt: float | str | None = None,
            le: float | str | None = None, lt: float | str | None = None) -> Any:
    """A dataclass field whose value (each item, for a list) ``load_config`` keeps within bounds.

    A bound is a number or the name of a sibling field (``crop = bounded(224, ge=1, le="resize")``),
    so each rule is written once, beside the default it constrains.
    """
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"bounds": bounds})
    return dataclasses.field(default=default, metadata={"bounds": bounds})


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:      # e.g. a name too long for the file system: not a config either way
        return False


def resolve_config_path(path: str | os.PathLike) -> Path:
    """Accept an existing path, or a name relative to the project's ``configs/`` folder."""
    p = Path(path)
    for candidate in (p, CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if _is_file(candidate):
            return candidate
    raise ConfigError(f"config file not found: {excerpt(path)} (also looked in {CONFIG_DIR})")


def _expanded_size(root: yaml.Node, where: str) -> tuple[int, int]:
    """(nodes, scalar characters) of a composed YAML document once its aliases are expanded.

    An alias is the same node object as its anchor, so memoising by node makes this linear in the
    file even when the expansion is exponential; an alias inside its own anchor is a cycle.
    """
    sizes: dict[int, tuple[int, int] | None] = {}

    def size(node: yaml.Node, depth: int) -> tuple[int, int]:
        if depth > MAX_DEPTH:
            raise ConfigError(f"{where} is nested deeper than {MAX_DEPTH} levels")
        if id(node) in sizes:
            known = sizes[id(node)]
            if known is None:
                raise ConfigError(f"{where}: an alias refers to a node that contains it")
            return known
        sizes[id(node)] = None
        nodes, chars = 1, 0
        if isinstance(node, yaml.ScalarNode):
            chars = len(node.value)
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else [n for kv in node.value for n in kv]
            for child in children:
                n, c = size(child, depth + 1)
                nodes, chars = nodes + n, chars + c
        sizes[id(node)] = (nodes, chars)
        return nodes, chars

    return size(root, 0)


def parse_yaml(text: str, where: str) -> Any:
    """YAML text -> Python objects, refused (``ConfigError``) if it would expand beyond the limits.

    The document is composed (aliases stay shared nodes), measured, and only then constructed.
    """
    loader = get_yaml_loader()(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        nodes, chars = _expanded_size(node, where)
        if nodes > MAX_NODES or chars > MAX_TEXT_CHARS:
            raise ConfigError(f"{where} expands to {nodes} YAML nodes / {chars} characters (limits: "
                              f"{MAX_NODES} / {MAX_TEXT_CHARS}); aliases repeat what they refer to")
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        raise ConfigError(f"cannot parse {where}:{at} {excerpt(e.problem or e.context)}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse {where}: {type(e).__name__}") from None
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply") from None
    finally:
        loader.dispose()


def _read_text(path: Path) -> str:
    """A config file's text: at most ``MAX_FILE_BYTES``, UTF-8."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"config {path} is larger than {MAX_FILE_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config {path} is not UTF-8 text") from None


def _read_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[DictConfig]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config 'base' chain loops back to {path}")
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise ConfigError(f"config {path} is not a .yaml or .yml file")
    data = parse_yaml(_read_text(path), f"config {path}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at top level")
    base = data.pop("base", None)
    layers = []
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"config {path}: 'base' must name a .yaml file, got {excerpt(base)}")
        base_path = path.parent / base
        if not _is_file(base_path):
            base_path = resolve_config_path(base)
        layers = _read_layers(base_path, seen + (path,))
    return layers + [OmegaConf.create(data)]


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or getattr(e, "key", None)
    msg = (str(getattr(e, "msg", None) or e).splitlines() or [""])[0]
    return f"config key '{excerpt(key)}': {excerpt(msg)}" if key else f"config error: {excerpt(msg)}"


def _leaves(node: Any, key: str = ""):
    """(dotted key, value) of every scalar in a plain nested dict/list."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, f"{key}[{i}]")
    else:
        yield key, node


def _check_bounds(cfg: DictConfig, prefix: str = "") -> None:
    """Every ``bounded`` field of the schema (nested schemas too) within its bounds."""
    for f in dataclasses.fields(OmegaConf.get_type(cfg)):
        value = cfg[f.name]
        if isinstance(value, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(value)):
            _check_bounds(value, f"{prefix}{f.name}.")
        for op, bound in f.metadata.get("bounds", {}).items():
            test, says = _BOUNDS[op]
            limit = cfg[bound] if isinstance(bound, str) else bound
            for item in (value if isinstance(value, ListConfig) else [value]):
                if item is not None and not test(item, limit):
                    than = f"{bound} ({limit})" if isinstance(bound, str) else limit
                    each = " (each item)" if isinstance(value, ListConfig) else ""
                    raise ConfigError(f"config key '{prefix}{f.name}'{each} must be {says} {than}, "
                                      f"got {excerpt(item)}")


def _check_values(cfg: DictConfig) -> None:
    """No NaN or infinity anywhere (free-form dicts included), and every declared bound holds."""
    for key, value in _leaves(OmegaConf.to_container(cfg, resolve=False)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{excerpt(key)}' must be a finite number, got {value}")
    _check_bounds(cfg)


def load_config(schema: type[T], path: str | os.PathLike | None = None,
                overrides: Sequence[str] = ()) -> T:
    """Merge ``schema`` defaults <- YAML file (with its ``base`` chain) <- ``key=value`` overrides.

    Then check values (finite floats, declared bounds). Returns an OmegaConf object typed as the
    schema (attribute access, struct mode).
    """
    cfg = OmegaConf.structured(schema)
    try:
        if path is not None:
            for layer in _read_layers(resolve_config_path(path)):
                cfg = OmegaConf.merge(cfg, layer)
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got: {excerpt(' '.join(bad))}")
        if overrides:
            layer = OmegaConf.create()
            for item in overrides:      # what OmegaConf.from_dotlist does, with the bounded YAML reader
                key, value = item.split("=", 1)
                OmegaConf.update(layer, key, parse_yaml(value, f"override '{excerpt(key)}'"))
            cfg = OmegaConf.merge(cfg, layer)
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"config key '{missing[0]}' is required but has no value"
                              + (f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else ""))
        _check_values(cfg)
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
