"""Registries by name, filled from Python entry points: how guidance methods, generate stages and 2D
distillation methods are found, built-in and third-party alike.

A registry maps a name to an :class:`Entry`: the method's config dataclass (its section of the run's config,
under the entry's name), its builder, and whatever else the kind needs (a guidance's preset YAML, a stage's
order). It is filled from the entry points of one group, so a package adds a method by declaring, in its
``pyproject.toml``::

    [project.entry-points."text3d.guidance"]
    my_sds = "my_package.plugin:my_sds"     # an Entry (here a GuidanceMethod) or a function returning one

text3d registers its own methods the same way (see its ``pyproject.toml``). The three groups:

  text3d.guidance   GuidanceMethod  (text3d.generate.config)   `text3d generate --guidance NAME`
  text3d.stages     StageKind       (text3d.generate.config)   `text3d generate --stages a,b,...`
  text3d.distill2d  Distill2DMethod (text3d.distill2d.config)  `text3d distill2d --method NAME`

Names come from the entry points' metadata alone; a plug-in's module is imported on the first lookup of its
name (:meth:`Registry.get`), or when every entry is needed (:meth:`Registry.entries`, e.g. to build a config
schema with one section per method). This module imports nothing beyond the standard library and
:mod:`text3d.errors`, so creating a registry never imports torch, diffusers or a plug-in. An unknown name is
a one-line :class:`~text3d.errors.ConfigError` listing the known names; a plug-in that fails to import, or
that does not give an entry of the registry's kind, is a one-line :class:`PluginError` naming the plug-in.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, TypeVar

from text3d.errors import ConfigError, UserError

GUIDANCE_GROUP = "text3d.guidance"
STAGES_GROUP = "text3d.stages"
DISTILL2D_GROUP = "text3d.distill2d"


class PluginError(UserError):
    """A registered plug-in that cannot be loaded, or that registers something of the wrong kind."""


@dataclass(frozen=True, kw_only=True)
class Entry:
    """What one registered name stands for. Kinds subclass it (frozen, ``kw_only``) with their own fields.

    ``config``: the dataclass of the method's settings (its section of the run's config, under ``name``), or
    None when it has none; ``default``: a factory of that section's defaults (None: ``config()``);
    ``build``: the builder (its signature is the kind's: see the subclass); ``name``: filled in by the
    registry from the entry point's name.
    """

    build: Callable[..., Any]
    config: type | None = None
    default: Callable[[], Any] | None = None
    name: str = ""

    def section(self) -> Any:
        """A fresh instance of the method's config section with its defaults (None without a config)."""
        if self.config is None:
            return None
        return (self.default or self.config)()


E = TypeVar("E", bound=Entry)


def preset_path(preset: str | os.PathLike | None) -> Path | None:
    """A preset given as str or path, as a Path (None stays None)."""
    return None if preset is None else Path(preset)


class Registry(Generic[E]):
    """Names -> entries of one kind, from the entry points of ``group`` (module docstring).

    ``label`` names the setting in messages (``guidance must be one of sds, vsd, got 'x'``); ``entry_type`` is
    the kind's :class:`Entry` subclass, which every plug-in must give.
    """

    def __init__(self, group: str, label: str, entry_type: type[E]):
        self.group, self.label, self.entry_type = group, label, entry_type
        self._points: dict[str, list[EntryPoint]] | None = None
        self._loaded: dict[str, E] = {}
        self._added: dict[str, E] = {}

    def __repr__(self) -> str:
        return f"Registry({self.group!r}, {len(self.names())} names)"

    # --------------------------------------------------------------------------------------------- names
    def _entry_points(self) -> dict[str, list[EntryPoint]]:
        if self._points is None:
            points: dict[str, list[EntryPoint]] = {}
            for point in entry_points(group=self.group):
                same = points.setdefault(point.name, [])
                if all(p.value != point.value for p in same):
                    same.append(point)
            self._points = points
        return self._points

    def names(self) -> tuple[str, ...]:
        """Every registered name, sorted; reads entry-point metadata only (imports no plug-in)."""
        return tuple(sorted(set(self._entry_points()) | set(self._added)))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def unknown(self, name: object) -> ConfigError:
        """The one-line error for a name that is not registered."""
        return ConfigError(f"{self.label} must be one of {', '.join(self.names()) or '(none registered)'}, "
                           f"got {name!r}")

    # ------------------------------------------------------------------------------------------- entries
    def get(self, name: str) -> E:
        """The entry registered as ``name``, its plug-in imported on first use."""
        if name in self._added:
            return self._added[name]
        if name in self._loaded:
            return self._loaded[name]
        points = self._entry_points().get(name) if isinstance(name, str) else None
        if not points:
            raise self.unknown(name)
        if len(points) > 1:
            raise PluginError(f"{self.label} {name!r} is registered more than once in entry-point group {self.group} "
                              f"({', '.join(_describe(p) for p in points)}); uninstall one of them")
        self._loaded[name] = self._load(name, points[0])
        return self._loaded[name]

    def entries(self) -> dict[str, E]:
        """Every entry by name (sorted), each plug-in imported; a broken one raises :class:`PluginError`."""
        return {name: self.get(name) for name in self.names()}

    def register(self, name: str, entry: E) -> None:
        """Register ``entry`` as ``name`` in this process only (tests, notebooks); it shadows an entry point."""
        self._added[name] = self._named(name, self._check(name, entry, "register()"))

    def _load(self, name: str, point: EntryPoint) -> E:
        try:
            obj = point.load()
            if not isinstance(obj, Entry) and callable(obj):
                obj = obj()
        except Exception as exc:  # ImportError, AttributeError, an error inside the plug-in's function
            reason = str(exc).splitlines()[0] if str(exc) else ""
            raise PluginError(f"the {self.label} plug-in {name!r} ({_describe(point)}) failed to load: "
                              f"{type(exc).__name__}: {reason}") from exc
        return self._named(name, self._check(name, obj, _describe(point)))

    def _check(self, name: str, obj: Any, where: str) -> E:
        if not isinstance(obj, self.entry_type):
            raise PluginError(f"the {self.label} plug-in {name!r} ({where}) gave a {type(obj).__name__}, not a "
                              f"{self.entry_type.__name__} (or a function returning one)")
        return obj

    @staticmethod
    def _named(name: str, entry: E) -> E:
        return entry if entry.name == name else dataclasses.replace(entry, name=name)


def _describe(point: EntryPoint) -> str:
    dist = getattr(point, "dist", None)
    return f"{point.value} from {dist.name}" if dist is not None else point.value


def group_names(group: str) -> tuple[str, ...]:
    """The names registered under entry-point ``group`` (metadata only), sorted."""
    return tuple(sorted({p.name for p in entry_points(group=group)}))


__all__ = ["DISTILL2D_GROUP", "Entry", "GUIDANCE_GROUP", "PluginError", "Registry", "STAGES_GROUP", "group_names",
           "preset_path"]


def loadable(registry: Registry) -> dict[str, Any]:
    """The registry's entries that load, by name; a broken plug-in is left out here and raises its PluginError
    when its name is used, so it cannot break runs that do not use it."""
    entries = {}
    for name in registry.names():
        try:
            entries[name] = registry.get(name)
        except PluginError:
            pass
    return entries


def with_sections(base: type, named_entries: Iterator[tuple[str, str, Entry]] | list, what: str) -> type:
    """``base`` (a config dataclass) extended by one field per ``(kind, name, entry)`` whose entry has a
    config: the field ``name`` holds an instance of ``entry.config`` (defaults ``entry.section()``); ``base``
    itself when there is none. A name that is already a field, or given twice, is a PluginError."""
    taken = {f.name for f in dataclasses.fields(base)}
    sections = []
    for kind, name, entry in named_entries:
        if entry.config is None:
            continue
        if name in taken:
            raise PluginError(f"the {kind} plug-in {name!r} cannot have a config section: {name!r} is already a "
                              f"key of the {what}")
        taken.add(name)
        sections.append((name, entry.config, dataclasses.field(default_factory=entry.section)))
    if not sections:
        return base
    return dataclasses.make_dataclass(base.__name__, sections, bases=(base,), namespace={"__module__": base.__module__})

