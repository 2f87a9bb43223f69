"""Plugin discovery (pluggy + the ``fer.plugins`` entry-point group) and factory validation."""

from __future__ import annotations

import difflib
import inspect
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterable

import pluggy
from pydantic import ConfigDict, ValidationError, create_model

from .errors import FerError
from .hookspecs import KINDS, PROJECT, FerSpecs

ENTRY_POINT_GROUP = "fer.plugins"
#: comma-separated plugin (entry-point) names to block, for when a recipe cannot say it
DISABLE_ENV = "FER_DISABLE_PLUGINS"


@dataclass(frozen=True)
class Component:
    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str  # entry-point name
    distribution: str
    version: str

    def params(self) -> dict[str, inspect.Parameter]:
        """Recipe keys: the factory's parameters that are not positional-only."""
        sig = inspect.signature(self.factory)
        return {
            n: p
            for n, p in sig.parameters.items()
            if p.kind not in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }

    def validate(self, params: dict[str, Any], where: str) -> dict[str, Any]:
        """Check recipe values against the factory's annotations; return coerced values."""
        accepted = self.params()
        for key in params:
            if key not in accepted:
                raise FerError(
                    f"{where}.{key}: unknown key for {self.kind} plugin '{self.name}'"
                    f"{_did_you_mean(key, accepted)}; accepted: {', '.join(accepted) or '(none)'}"
                )
        fields: dict[str, Any] = {}
        hints = _type_hints(self.factory)
        for n, p in accepted.items():
            ann = hints.get(n, Any)
            default = ... if p.default is p.empty else p.default
            fields[n] = (ann, default)
        model = create_model(
            f"{self.kind}_{self.name}_params",
            # `-o key=5` arrives as a number: accept it where the plugin wants a string
            __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True, strict=False,
                                  coerce_numbers_to_str=True),
            **fields,
        )
        try:
            values = dict(model(**params))
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            got = err.get("input")
            raise FerError(f"{where}.{loc}: {err['msg']} (got {got!r})") from None
        # a factory whose params hold nested plugin tables checks them too (e.g. a multi-task loss)
        nested = getattr(self.factory, "validate_nested", None)
        if nested is not None:
            nested(values, where)
        return values


def _type_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    import typing

    try:
        return typing.get_type_hints(fn)
    except Exception:  # unresolved forward refs: fall back to no checking for those keys
        return {}


def _did_you_mean(key: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry:
    """All components of all loaded plugins, by kind and name."""

    def __init__(self, disabled: Iterable[str] = ()) -> None:
        self.disabled = sorted(set(disabled))
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(FerSpecs)
        for name in self.disabled:
            self.pm.set_blocked(name)
        try:
            self.pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except Exception as e:  # a broken third-party plugin must not read as a core crash
            raise FerError(f"a plugin in entry-point group '{ENTRY_POINT_GROUP}' failed to load: {e}") from e
        dists = {id(p): d for p, d in self.pm.list_plugin_distinfo()}
        self.components: dict[str, dict[str, Component]] = {k: {} for k in KINDS}
        for kind, hook in KINDS.items():
            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                dist = dists.get(id(impl.plugin))
                dname = dist.project_name if dist else "(not installed)"
                version = dist.version if dist else "?"
                impl.function(register=self._registrar(kind, impl.plugin_name, dname, version))

    def add_plugin(self, plugin: object, name: str, distribution: str = "(runtime)") -> None:
        """Register a plugin object at run time (notebooks, tests), like pytest's ``pm.register``."""
        self.pm.register(plugin, name=name)
        for kind, hook in KINDS.items():
            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                if impl.plugin is plugin:
                    impl.function(register=self._registrar(kind, name, distribution, "?"))

    def _registrar(self, kind: str, plugin: str, dist: str, version: str) -> Callable[..., None]:
        def register(name: str, factory: Callable[..., Any]) -> None:
            existing = self.components[kind].get(name)
            if existing is not None:
                raise FerError(
                    f"{kind} '{name}' is registered twice: by distribution '{existing.distribution}' "
                    f"(plugin '{existing.plugin}') and by distribution '{dist}' (plugin '{plugin}'); "
                    f"disable one with {DISABLE_ENV}={plugin} or [plugins] disable = [\"{plugin}\"]"
                )
            self.components[kind][name] = Component(kind, name, factory, plugin, dist, version)

        return register

    def get(self, kind: str, name: str, where: str) -> Component:
        found = self.components[kind].get(name)
        if found is None:
            names = sorted(self.components[kind])
            raise FerError(
                f"{where}.plugin: unknown {kind} plugin '{name}'{_did_you_mean(name, names)}; "
                f"installed: {', '.join(names) or '(none)'}"
            )
        return found

    def build(self, kind: str, spec: dict[str, Any], where: str, *context: Any) -> Any:
        """Build a component from a recipe table ``{plugin = ..., **params}``."""
        spec = dict(spec)
        comp = self.get(kind, spec.pop("plugin"), where)
        params = comp.validate(spec, where)
        return comp.factory(*context, **params)

    def rows(self) -> list[dict[str, str]]:
        return [
            {"kind": c.kind, "name": c.name, "plugin": c.plugin, "distribution": c.distribution, "version": c.version}
            for kind in KINDS
            for c in sorted(self.components[kind].values(), key=lambda c: c.name)
        ]

    def versions(self) -> dict[str, str]:
        return {f"{r['distribution']}": r["version"] for r in self.rows()}


def disabled_from_env() -> list[str]:
    return [n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()]


@lru_cache(maxsize=8)
def _cached(disabled: tuple[str, ...]) -> Registry:
    return Registry(disabled)


def get_registry(disabled: Iterable[str] = ()) -> Registry:
    return _cached(tuple(sorted(set(disabled) | set(disabled_from_env()))))
