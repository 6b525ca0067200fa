"""Experiment configs (``configs/*.py``, ml_collections ConfigDicts): declaring keys, reading them
checked, overriding them, and what both backends build the same way (scheduler, workload).

**Keys.** ``configs/default.py`` declares every key once, as ``Key(path, default, help)``, and
``build_config`` turns the declarations into the ConfigDict. Readers have no defaults:
``get(config, "a.b")`` returns the value or raises ``ConfigError`` naming the key, with a
did-you-mean (``difflib``) or, when nothing is close, the keys of that section. ``section(config,
"workload")`` is the same check as a read-only mapping, for code that takes a whole sub-config
(``workload_from_config``); its ``.get(key, default)`` is strict too, so a library default can never
stand in for a key the config lacks. ``ConfigError`` is a ValueError, deliberately not a KeyError
or AttributeError, so ``getattr(x, k, default)`` / ``Mapping.get`` cannot swallow it.

**Scheduler options are derived from the scheduler registry**, not written out in default.py
(``scheduler_keys``): the section holds every scalar option (bool, int, float, str) of every
registered policy with that policy's own default. So every option of every policy is settable as
``--config.scheduler.<option>=...``, a policy registered before ``get_config()`` runs (a research
config's own) gets its options too, and each default exists once: in the policy's dataclass, where
``jaxserve.scheduler.make(name)`` finds it as well. Declaring the union in default.py instead would
write each default twice (default.py and the dataclass), and deciding "the user set this option"
would need default.py at run time, which the package cannot import (``configs/`` is not part of
it). ``build_scheduler`` passes the chosen policy only the options it takes (a constructor with
``**options`` and a ``base`` option, like ``vtc``, takes its base policy's options too); an option
it does not take is an error when its value differs from the default, since whoever set it expected
an effect. Non-scalar options (``order``, ``preempt_rank``, VTC's ``weights``) are Python objects,
for code rather than configs. Routers, clusters and meshes can reuse the same scheme.

**Overrides.** ``override(config, {"workload.qps": 4.0})`` returns a checked copy (unknown keys
and wrong types raise); ``parse_value`` reads a command-line string as the key's type. ml_collections'
own checks are not enough: a ``placeholder(float)`` takes a str, an int field takes ``True``.

**Recording.** ``Recording(config)`` notes every key read through it, which is how the tests prove
that every declared key is read by some code path.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import numbers
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Optional

import numpy as np
from ml_collections import ConfigDict
from ml_collections.config_dict import FieldReference

import jaxserve.scheduler as scheduler_registry
from jaxserve.kv.config import KVConfig
from jaxserve.runtime.events import FrozenLog
from jaxserve.scheduler import registry as _registry
from jaxserve.workload import workload_from_config


class ConfigError(ValueError):
    """A config key is unknown, or its value is missing, of the wrong type or out of range; the
    message names the key."""


SEE_ALL_KEYS = "Every key, with its default and meaning: configs/default.py, or --config_help."


def _unknown(message: str) -> ConfigError:
    return ConfigError(f"{message}. {SEE_ALL_KEYS}")


@dataclasses.dataclass(frozen=True)
class Results:
    metrics: dict  # the metrics.json content
    requests: list[dict]  # one row per request (the per-request CSV)
    log: FrozenLog
    kv: KVConfig
    scheduler: Any


# -- declaring keys ---------------------------------------------------------------------------------

_SCALARS = (bool, int, float, str)


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key: dotted ``path``, ``default`` and a one-line ``help``. An ``optional`` key may
    be None (unset); a None default makes a key optional and needs its ``type``."""

    path: str
    default: Any
    help: str
    type: Optional[type] = None
    optional: bool = False

    def __post_init__(self):
        if self.default is None:
            object.__setattr__(self, "optional", True)
            if self.type not in _SCALARS:
                raise ValueError(f"config key {self.path!r}: a key without a default needs type= one of {_SCALARS}")
        elif self.type is None:
            object.__setattr__(self, "type", type(self.default))
        if not _fits(self.default, self.type, self.optional):
            raise ValueError(f"config key {self.path!r}: default {self.default!r} is not {_kind_name(self.type, False)}")


def build_config(keys: Iterable[Key]) -> ConfigDict:
    """The ConfigDict the declarations describe; optional keys
    are typed FieldReferences (``placeholder`` when unset), which is how ``override`` knows that
    None is allowed. A path declared twice is a ValueError."""
    root = ConfigDict()
    for key in keys:
        *sections, leaf = key.path.split(".")
        node = root
        for part in sections:
            if part not in node:
                node[part] = ConfigDict()
            node = node[part]
        if leaf in node:
            raise ValueError(f"config key {key.path!r} is declared twice")
        node[leaf] = FieldReference(key.default, field_type=key.type) if key.optional else key.default
    return root


# -- reading ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recording:
    """``config`` whose leaf reads through ``get``/``section`` are added to ``reads`` (dotted keys)."""

    config: Any
    reads: set = dataclasses.field(default_factory=set)


def _unwrap(config) -> tuple[Any, Optional[set]]:
    if isinstance(config, Recording):
        return config.config, config.reads
    return config, None


def _children(node) -> Optional[list[str]]:
    """The keys of a section, or None when ``node`` is a value."""
    if isinstance(node, ConfigDict):
        return list(node.keys())
    if isinstance(node, Mapping):
        return list(node)
    return None


def leaf_keys(config) -> list[str]:
    """Every dotted key that holds a value (not a section), depth first."""
    root, _ = _unwrap(config)
    out: list[str] = []

    def walk(node, prefix):
        for name in _children(node):
            child = node[name]
            path = f"{prefix}{name}"
            if _children(child) is None:
                out.append(path)
            else:
                walk(child, path + ".")

    walk(root, "")
    return out


def unknown_key(config, key: str) -> ConfigError:
    """The error for ``key`` missing from ``config``: did-you-mean when a key is close, otherwise
    the keys of the section where the path stops matching."""
    root, _ = _unwrap(config)
    parts = key.split(".")
    node, depth = root, 0
    while depth < len(parts) and _children(node) is not None and parts[depth] in _children(node):
        node, depth = node[parts[depth]], depth + 1
    where = ".".join(parts[:depth])
    if _children(node) is None:
        return _unknown(f"unknown config key {key!r} ({where!r} is a value, not a section)")
    siblings = _children(node)
    guess = _close_key(root, parts, depth, siblings)
    if guess:
        return _unknown(f"unknown config key {key!r} (did you mean {guess!r}?)")
    listing = ", ".join(sorted(siblings))
    if depth == 0:
        return _unknown(f"unknown config key {key!r} (top-level keys: {listing})")
    return _unknown(f"unknown config key {key!r} (keys of {where!r}: {listing})")


def _close_key(root, parts: list[str], depth: int, siblings: list[str]) -> Optional[str]:
    """The most likely intended key: the path with its first unknown part corrected, else the one
    key elsewhere with the same last part (``qps`` -> ``workload.qps``), else the close sibling."""
    leaves = leaf_keys(root)
    for match in difflib.get_close_matches(parts[depth], siblings, n=3, cutoff=0.6):
        fixed = ".".join(parts[:depth] + [match] + parts[depth + 1 :])
        if fixed in leaves:
            return fixed
    same_leaf = [k for k in leaves if k.rsplit(".", 1)[-1] == parts[-1]]
    if len(same_leaf) == 1:
        return same_leaf[0]
    match = difflib.get_close_matches(parts[depth], siblings, n=1, cutoff=0.6)
    return ".".join(parts[:depth] + match) if match else None


def _lookup(root, key: str):
    node = root
    for part in key.split("."):
        names = _children(node)
        if names is None or part not in names:
            raise unknown_key(root, key)
        node = node[part]
    return node


_KIND_NAMES = {bool: "a bool (True or False)", int: "an int", float: "a float", str: "a str"}


def _kind_name(kind, optional: bool) -> str:
    name = _KIND_NAMES.get(kind, getattr(kind, "__name__", str(kind)))
    return f"{name} or None" if optional else name


def _fits(value, kind, optional: bool) -> bool:
    """Strict type test: bools are not ints, ints are floats, None only when ``optional``."""
    if value is None:
        return optional
    if kind is bool:
        return isinstance(value, (bool, np.bool_))
    if kind is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    if kind is float:
        return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    return isinstance(value, kind)


def get(config, key: str, kind: Optional[type] = None, *, optional: bool = False):
    """The value at dotted ``key``. ConfigError when the config has no such key (see
    ``unknown_key``), when it names a section, or when ``kind`` is given and the value is not one
    (None passes only when ``optional``; ints pass as floats and come back as floats)."""
    root, reads = _unwrap(config)
    value = _lookup(root, key)
    if _children(value) is not None:
        raise ConfigError(f"{key} is a section, not a value (its keys: {', '.join(_children(value))})")
    if reads is not None:
        reads.add(key)
    if kind is not None:
        if not _fits(value, kind, optional):
            raise ConfigError(f"{key} must be {_kind_name(kind, optional)}, got {value!r}")
        if kind is float and value is not None:
            value = float(value)
    return value


@dataclasses.dataclass(frozen=True, eq=False)
class Section(Mapping):
    """Read-only, checked view of the sub-config at ``prefix``: values are read through ``get`` (so
    recorded), sub-sections come back as Sections, and ``get(key, default)`` is strict — a key the
    config lacks raises ConfigError instead of returning ``default``."""

    config: Any
    prefix: str

    def _node(self):
        return _lookup(_unwrap(self.config)[0], self.prefix)

    def __getitem__(self, name: str):
        path = f"{self.prefix}.{name}"
        node = _lookup(_unwrap(self.config)[0], path)
        return Section(self.config, path) if _children(node) is not None else get(self.config, path)

    def get(self, name: str, default: Any = None):  # noqa: ARG002 - strict by design, see the docstring
        return self[name]

    def __contains__(self, name) -> bool:
        return name in _children(self._node())

    def __iter__(self) -> Iterator[str]:
        return iter(_children(self._node()))

    def __len__(self) -> int:
        return len(_children(self._node()))


def section(config, key: str) -> Section:
    """The sub-config at ``key`` as a ``Section``; ConfigError when there is none."""
    node = _lookup(_unwrap(config)[0], key)
    if _children(node) is None:
        raise ConfigError(f"{key} is a value, not a section")
    return Section(config, key)


def check_keys(config, reference) -> None:
    """ConfigError for the first key of ``config`` that ``reference`` (the declared defaults) does
    not have: a key a config file added is read by nothing, so it is most likely a typo."""
    known = set(leaf_keys(reference))
    for key in leaf_keys(config):
        if key not in known:
            raise unknown_key(reference, key)


# -- overriding ------------------------------------------------------------------------------------


def _parent(config, key: str):
    """(section, leaf name) of an existing value key."""
    root, _ = _unwrap(config)
    value = _lookup(root, key)
    if _children(value) is not None:
        raise ConfigError(f"{key} is a section; set its keys ({', '.join(f'{key}.{k}' for k in _children(value))})")
    *sections, leaf = key.split(".")
    return (_lookup(root, ".".join(sections)) if sections else root), leaf


def _field_kind(parent, leaf) -> tuple[Optional[type], bool]:
    """(type, optional) of a field: its declared type and whether None is allowed."""
    value = parent[leaf]
    if isinstance(parent, ConfigDict):
        kind = parent.get_type(leaf)
        # ml_collections has no public test for "declared with placeholder()": look at the field.
        optional = value is None or isinstance(parent._fields.get(leaf), FieldReference)
    else:
        kind, optional = type(value), value is None
    return (None if kind is type(None) else kind), optional


def key_type(config, key: str) -> tuple[Optional[type], bool]:
    """(type, optional) of an existing value key; None for the type when nothing declares one."""
    return _field_kind(*_parent(config, key))


def override(config, values: Mapping[str, Any]) -> ConfigDict:
    """A deep copy of ``config`` with each dotted key of ``values`` set, checked like ``get``:
    unknown keys, sections and values of the wrong type raise ConfigError."""
    out = copy.deepcopy(config)
    for key, value in values.items():
        parent, leaf = _parent(out, key)
        kind, optional = _field_kind(parent, leaf)
        if kind is not None and not _fits(value, kind, optional):
            raise ConfigError(f"{key} must be {_kind_name(kind, optional)}, got {value!r}")
        parent[leaf] = float(value) if kind is float and value is not None else value
    return out


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _parse_bool(text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise ValueError(text)


_PARSERS = {bool: _parse_bool, int: int, float: float, str: str}


def parse_value(config, key: str, text: str):
    """``text`` (a command-line value) as ``key``'s type: ints, floats, True/False (or 1/0, yes/no),
    strings as given, "none" for an optional key. ConfigError names the key, type and text."""
    kind, optional = key_type(config, key)
    if optional and text.lower() in ("none", "null"):
        return None
    parse = _PARSERS.get(kind)
    if parse is None:
        raise ConfigError(f"{key} holds a {getattr(kind, '__name__', kind)}, which cannot be set from the command line")
    try:
        return parse(text)
    except ValueError:
        raise ConfigError(f"{key} must be {_kind_name(kind, optional)}, got {text!r}") from None


# -- scheduler options -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PolicyOption:
    """A scalar scheduler option: its default and the registered policies that declare it."""

    name: str
    default: Any
    policies: tuple[str, ...]


def _constructor(name: str):
    return _registry.constructor(name)


def _own_options(constructor) -> dict[str, Any]:
    """Scalar options (bool, int, float, str defaults) a policy constructor declares itself."""
    if dataclasses.is_dataclass(constructor):
        return {f.name: f.default for f in dataclasses.fields(constructor) if f.init and isinstance(f.default, _SCALARS)}
    params = inspect.signature(constructor).parameters.values()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in params if p.kind in named and isinstance(p.default, _SCALARS)}


def _forwards_to_base(constructor) -> bool:
    """A wrapper policy (``vtc``): takes ``base`` and passes its ``**options`` on to that policy."""
    if dataclasses.is_dataclass(constructor):
        return False
    params = inspect.signature(constructor).parameters
    return "base" in params and any(p.kind == p.VAR_KEYWORD for p in params.values())


def scheduler_options() -> dict[str, PolicyOption]:
    """Every scalar option of every registered policy. One option name has one default across
    policies (a ValueError otherwise: one config key cannot hold two defaults)."""
    table: dict[str, PolicyOption] = {}
    for name in scheduler_registry.available():
        for option, default in _own_options(_constructor(name)).items():
            if option == "name":
                raise ValueError(f"scheduler {name!r} has an option called 'name', which the config uses for the policy")
            prev = table.get(option)
            if prev is not None and (prev.default != default or type(prev.default) is not type(default)):
                raise ValueError(
                    f"scheduler option {option!r} defaults to {prev.default!r} in {', '.join(prev.policies)} but to "
                    f"{default!r} in {name}; a config key holds one default"
                )
            table[option] = PolicyOption(option, default, (prev.policies if prev else ()) + (name,))
    return table


def scheduler_keys(help: Mapping[str, str], prefix: str = "scheduler") -> tuple[Key, ...]:
    """One ``Key`` per scheduler option (``scheduler_options``), its help from ``help`` (option ->
    text) followed by the policies that take it."""
    wrappers = [n for n in scheduler_registry.available() if _forwards_to_base(_constructor(n))]
    keys = []
    for option in scheduler_options().values():
        text = help.get(option.name, "")
        via = [f"{w} via base" for w in wrappers if w not in option.policies]
        owners = f"[{', '.join(option.policies + tuple(via))}]"
        keys.append(Key(f"{prefix}.{option.name}", option.default, f"{text} {owners}" if text else owners))
    return tuple(keys)


def accepted_options(name: str, values: Mapping[str, Any]) -> frozenset[str]:
    """The scalar options policy ``name`` takes; for a wrapper, also those of the base policy that
    ``values["base"]`` (or its default) names."""
    constructor = _constructor(name)
    own = set(_own_options(constructor))
    if _forwards_to_base(constructor):
        base = values.get("base", _own_options(constructor).get("base"))
        if base != name and base in scheduler_registry.available():
            own |= accepted_options(base, values)
    return frozenset(own)


def scheduler_kwargs(config) -> tuple[str, dict]:
    """(policy name, the options to pass it) from the ``scheduler`` section; see the module
    docstring. ConfigError for an unknown policy, an option no policy has, a value of the wrong
    type, an option the chosen policy takes but the section lacks, or a non-default value of an
    option the chosen policy does not take."""
    name = get(config, "scheduler.name", str)
    names = scheduler_registry.available()
    if name not in names:
        guess = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {guess[0]!r}?)" if guess else ""
        raise ConfigError(f"scheduler.name: unknown scheduler {name!r}{hint}; available: {', '.join(names)}")
    options = scheduler_options()
    values = {}
    for option in section(config, "scheduler"):
        if option == "name":
            continue
        key = f"scheduler.{option}"
        if option not in options:
            guess = difflib.get_close_matches(option, list(options), n=1)
            hint = f"did you mean 'scheduler.{guess[0]}'?" if guess else \
                f"no registered scheduler has it; options: {', '.join(sorted(options))}"
            raise _unknown(f"unknown config key {key!r} ({hint})")
        values[option] = get(config, key, type(options[option].default))
    accepted = accepted_options(name, values)
    missing = sorted(accepted - set(values))
    if missing:  # a config made before its policy was registered, or by hand: no defaults stand in
        raise ConfigError(f"config key 'scheduler.{missing[0]}' is missing (scheduler {name!r} takes it); "
                          "build the config with configs/default.py after registering the policy")
    for option, value in values.items():
        default = options[option].default
        if option not in accepted and value != default:
            raise ConfigError(
                f"scheduler.{option}={value!r} does not apply to scheduler {name!r} (it is an option of "
                f"{', '.join(options[option].policies)}; {name} takes: {', '.join(sorted(accepted))})"
            )
    return name, {k: v for k, v in values.items() if k in accepted}


def build_scheduler(config):
    """The config's scheduler (``scheduler_kwargs`` passed to ``jaxserve.scheduler.make``)."""
    name, options = scheduler_kwargs(config)
    try:
        return scheduler_registry.make(name, **options)
    except ValueError as e:
        message = str(e)
        words = re.findall(r"\w+", message)
        named = min((words.index(k), k) for k in options if k in words)[1] if set(words) & set(options) else "name"
        raise ConfigError(f"scheduler.{named}: {message}") from None


# -- shared run settings --------------------------------------------------------------------------


def positive_or_none(config, key: str) -> Optional[float]:
    """An optional float key that must be > 0 when set."""
    value = get(config, key, float, optional=True)
    if value is not None and not value > 0:
        raise ConfigError(f"{key} must be > 0 or unset (None), got {value!r}")
    return value


def slo_targets(config) -> dict:
    """``summarize``'s SLO arguments from ``slo.*`` (unset: no target)."""
    return {"slo_ttft_s": positive_or_none(config, "slo.ttft_s"), "slo_tpot_s": positive_or_none(config, "slo.tpot_s")}


def build_workload(config) -> list:
    """The config's requests (length-only unless the trace carries token ids)."""
    try:
        return workload_from_config(section(config, "workload"))
    except ConfigError:
        raise
    except (FileNotFoundError, ValueError) as e:  # the builder's messages name their key (workload.*)
        message = str(e)
        raise ConfigError(message if message.startswith("workload") else f"workload: {message}") from None
