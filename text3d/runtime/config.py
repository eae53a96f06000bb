"""The one config system: typed dataclasses, YAML files merged in order, then ``key=value`` overrides.

Every layer owns its dataclass; a command composes them (``RunConfig`` for generate,
``Distill2DConfig`` for distill2d). Unknown keys and values of the wrong type or range raise
:class:`~text3d.errors.ConfigError` with one line naming the key.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from text3d.errors import ConfigError


def _closest_key(base, key: str | None) -> str | None:
    """The existing key nearest in spelling to the unknown ``key`` among the keys at its level of ``base``,
    as a full dotted path (``train.stpes`` -> ``train.steps``), or None when none is close."""
    if not key:
        return None
    parent, _, name = str(key).rpartition(".")
    try:
        node = OmegaConf.select(base, parent) if parent else base
    except OmegaConfBaseException:
        return None
    if not isinstance(node, DictConfig):
        return None
    match = difflib.get_close_matches(name, [str(k) for k in node.keys()], n=1)
    if not match:
        return None
    return f"{parent}.{match[0]}" if parent else match[0]


def _merge(base, other, where: str):
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        reason = str(exc).splitlines()[0]
        if "Key" in type(exc).__name__ or "not in" in reason:
            near = _closest_key(base, key)
            hint = f"; did you mean '{near}'?" if near else ""
            raise ConfigError(f"unknown config key '{key}' in {where}{hint}") from None
        raise ConfigError(f"bad value for config key '{key}' in {where}: {reason}") from None


def resolve_config_path(path: str | Path) -> Path:
    """``path`` itself when it exists; else a shipped config of that name: a relative ``configs/NAME.yaml``
    or ``NAME.yaml`` that is not on disk is looked up in the package's ``text3d/configs/`` (so
    ``--config configs/vsd-sd21.yaml`` works from any folder). Otherwise ``path`` unchanged."""
    path = Path(path)
    if path.is_file() or path.is_absolute():
        return path
    from text3d.runtime.resources import CONFIG_DIR

    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    shipped = Path(CONFIG_DIR).joinpath(*parts) if parts else None
    return shipped if shipped is not None and shipped.is_file() else path


def load_structured(schema, paths: Sequence[str | Path] = (), overrides: Sequence[str] = ()):
    """A typed dataclass instance from ``schema`` (a dataclass type or instance), YAML ``paths`` merged
    in order, then ``key=value`` overrides; every failure is a one-line ConfigError."""
    cfg = OmegaConf.structured(schema)
    for path in [resolve_config_path(f) for f in paths]:
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:  # YAML syntax errors
            raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        cfg = _merge(cfg, loaded, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=0.005)")
        key, value = item.split("=", 1)
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            dotted = OmegaConf.from_dotlist([f"{key}={value}"])
        except Exception:
            raise ConfigError(f"override {item!r} could not be parsed") from None
        cfg = _merge(cfg, dotted, f"override {item!r}")
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"bad config: {str(exc).splitlines()[0]}") from None


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
