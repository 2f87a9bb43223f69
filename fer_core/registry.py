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
from .interfaces import traits_of
from .kinds import BY_NAME, ESSENTIAL_PLUGINS, KINDS, PROJECT, FerSpecs

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
            key, msg, got = pydantic_error(e, params)
            raise FerError(f"{where}.{key}: {msg} (got {got!r})") from None
        return values

    def describe(self) -> list[dict[str, str]]:
        """Recipe keys with type (ranges included), default (``fer plugins KIND NAME``)."""
        hints = _type_hints(self.factory)
        return [{"key": n, "type": _type_text(hints.get(n, p.annotation)),
                 "default": "(required)" if p.default is p.empty else repr(p.default)}
                for n, p in self.params().items()]


def pydantic_error(e: ValidationError, data: Any) -> tuple[str, str, Any]:
    """(key path, message, got) of a validation error as a recipe names it: union-member labels
    ('list[constrained-float]') dropped, list indices as [i], the messages of a union's members
    for one value joined with "or"."""
    def path(loc: tuple[Any, ...]) -> str:
        parts: list[str] = []
        node = data
        for x in loc:
            if isinstance(node, (list, tuple)) and isinstance(x, int) and parts:
                parts[-1] += f"[{x}]"
                node = node[x] if -len(node) <= x < len(node) else None
            elif isinstance(node, dict) or (node is None and not parts):
                parts.append(str(x))
                node = node.get(x) if isinstance(node, dict) else None
        return ".".join(parts)

    errs = e.errors()
    key = path(errs[0]["loc"])
    msgs = list(dict.fromkeys(x["msg"] for x in errs if path(x["loc"]) == key))
    return key, msgs[0] + "".join(", or " + m.removeprefix("Input should be ") for m in msgs[1:]), errs[0].get("input")


def _type_text(ann: Any) -> str:
    """``Annotated[float, Field(gt=0)]`` → "float (gt=0)"; generics argument by argument."""
    import dataclasses
    import types
    import typing

    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Annotated:
        metas = [m for info in args[1:] for m in getattr(info, "metadata", [info])]
        ranges = [f"{f.name}={getattr(m, f.name)}" for m in metas if dataclasses.is_dataclass(m)
                  for f in dataclasses.fields(m) if f.name != "strict"]
        return _type_text(args[0]) + (f" ({', '.join(ranges)})" if ranges else "")
    if origin is not None and args:
        inner = [_type_text(a) for a in args]
        if origin in (typing.Union, types.UnionType):
            return " | ".join(inner)
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(inner)}]"
    return ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")


def _type_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    import typing

    try:
        return typing.get_type_hints(fn, include_extras=True)  # keep Annotated ranges: they are the checks
    except Exception:  # unresolved forward refs: fall back to no checking for those keys
        return {}


def _did_you_mean(key: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry:
    """All components of all loaded plugins, by kind and name. One registry serves one recipe
    (its ``plugins.disable`` applied) and is handed down to everything built from it."""

    def __init__(self, disabled: Iterable[str] = ()) -> None:
        self.disabled = sorted(set(disabled))
        essential = [n for n in self.disabled if n in ESSENTIAL_PLUGINS]
        if essential:
            n = essential[0]
            raise FerError(f"plugins.disable: plugin '{n}' is essential: it provides {ESSENTIAL_PLUGINS[n]}, "
                           "the default every recipe falls back to, and cannot be disabled")
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(FerSpecs)
        for name in self.disabled:
            self.pm.set_blocked(name)
        try:
            self.pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except Exception as e:  # a broken third-party plugin must not read as a core crash
            raise FerError(f"a plugin in entry-point group '{ENTRY_POINT_GROUP}' failed to load: {e}") from e
        known = {ep.name for ep in _entry_points()}
        for name in self.disabled:
            if name not in known:
                raise FerError(f"plugins.disable: no plugin named '{name}'{_did_you_mean(name, known)}; "
                               f"installed: {', '.join(sorted(known))}")
        dists = {id(p): d for p, d in self.pm.list_plugin_distinfo()}
        self.components: dict[str, dict[str, Component]] = {k.name: {} for k in KINDS}
        for kind in KINDS:
            for impl in getattr(self.pm.hook, kind.hook).get_hookimpls():
                dist = dists.get(id(impl.plugin))
                dname = dist.project_name if dist else "(not installed)"
                version = dist.version if dist else "?"
                impl.function(register=self._registrar(kind.name, impl.plugin_name, dname, version))

    def add_plugin(self, plugin: object, name: str, distribution: str = "(runtime)") -> None:
        """Register a plugin object at run time (notebooks, tests), like pytest's ``pm.register``."""
        self.pm.register(plugin, name=name)
        for kind in KINDS:
            for impl in getattr(self.pm.hook, kind.hook).get_hookimpls():
                if impl.plugin is plugin:
                    impl.function(register=self._registrar(kind.name, name, distribution, "?"))

    def register_commands(self, cli: Any) -> None:
        self.pm.hook.register_commands(cli=cli)

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
            why = ""
            if BY_NAME[kind].default == name:
                why = f" (it is the default {kind}: give the table a plugin, or re-enable the plugin that provides it)"
            if self.disabled:
                why += f"; disabled plugins: {', '.join(self.disabled)}"
            raise FerError(
                f"{where}.plugin: unknown {kind} plugin '{name}'{_did_you_mean(name, names)}{why}; "
                f"installed: {', '.join(names) or '(none)'}"
            )
        return found

    def validate(self, kind: str, spec: dict[str, Any], where: str) -> dict[str, Any]:
        """Check a table ``{plugin = ..., **params}`` against its factory, nested tables included
        (through this registry); returns the table with every default filled in."""
        if not isinstance(spec, dict) or not isinstance(spec.get("plugin"), str):
            raise FerError(f"{where}: expected a table with a 'plugin' key naming a {kind} plugin")
        params = {k: v for k, v in spec.items() if k != "plugin"}
        comp = self.get(kind, spec["plugin"], where)
        values = comp.validate(params, where)
        t = traits_of(comp.factory)
        for key, child_kind in t.nested.items():
            if key in t.many:
                if not isinstance(values[key], dict):
                    raise FerError(f"{where}.{key}: expected a table of {child_kind} tables")
                values[key] = {n: self._child(child_kind, sub, f"{where}.{key}.{n}", spec["plugin"])
                               for n, sub in values[key].items()}
            else:
                values[key] = self._child(child_kind, values[key], f"{where}.{key}", spec["plugin"])
        return {"plugin": spec["plugin"], **values}

    def _child(self, kind: str, spec: Any, where: str, parent: str) -> dict[str, Any]:
        if isinstance(spec, dict) and spec.get("plugin") == parent:
            raise FerError(f"{where}: a '{parent}' {kind} cannot nest itself")
        return self.validate(kind, spec, where)

    def build(self, kind: str, spec: dict[str, Any], where: str, *context: Any) -> Any:
        """Build a component from a recipe table; nested tables are built first, by this same
        registry, with the parent's context when they are of the parent's kind."""
        values = self.validate(kind, spec, where)
        comp = self.get(kind, values.pop("plugin"), where)
        t = traits_of(comp.factory)
        for key, child_kind in t.nested.items():
            ctx = context if child_kind == kind else ()
            if key in t.many:
                values[key] = {n: self.build(child_kind, sub, f"{where}.{key}.{n}", *ctx) for n, sub in values[key].items()}
            else:
                values[key] = self.build(child_kind, values[key], f"{where}.{key}", *ctx)
        return comp.factory(*context, **values)

    def accepts_soft_labels(self, spec: dict[str, Any], where: str = "loss") -> bool:
        """Whether the loss a (validated) table names trains on ``batch["soft_label"]``."""
        decides = traits_of(self.get("loss", spec["plugin"], where).factory).accepts_soft_labels
        if isinstance(decides, str):  # a nested table decides, e.g. "losses.emotion"
            node: Any = spec
            for part in decides.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            return isinstance(node, dict) and self.accepts_soft_labels(node, f"{where}.{decides}")
        return bool(decides)

    def produces_soft_labels(self, spec: dict[str, Any], where: str) -> bool:
        return traits_of(self.get("batch_transform", spec["plugin"], where).factory).produces_soft_labels

    def rows(self) -> list[dict[str, str]]:
        return [
            {"kind": c.kind, "name": c.name, "plugin": c.plugin, "distribution": c.distribution, "version": c.version}
            for kind in KINDS
            for c in sorted(self.components[kind.name].values(), key=lambda c: c.name)
        ]

    def versions(self) -> dict[str, str]:
        return {f"{r['distribution']}": r["version"] for r in self.rows()}


def _entry_points() -> list[Any]:
    from importlib.metadata import entry_points

    return list(entry_points(group=ENTRY_POINT_GROUP))


def disabled_from_env() -> list[str]:
    return [n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()]


@lru_cache(maxsize=8)
def _cached(disabled: tuple[str, ...]) -> Registry:
    return Registry(disabled)


def get_registry(disabled: Iterable[str] = ()) -> Registry:
    return _cached(tuple(sorted(set(disabled) | set(disabled_from_env()))))
