"""``optimizer.state`` as torch shows it (views of the flat state), and how edits made to it are taken back.

The step reads flat buffers, not ``optimizer.state``: a view there is only a window onto them. A user who
resets state the torch way (``opt.state.clear()``, ``del opt.state[p]``, ``opt.state[p]["m.value"] =
torch.zeros_like(p)``) would otherwise be ignored without a word. :class:`InstalledState` hands out
dicts that flag any change made through their methods (so the per-step check is one attribute read),
remembers the tensors it put in, and reads the edits as what the optimizer must do:

- every entry of a parameter group removed (``state.clear()`` removes all): that group starts afresh,
  states at their initial values and step count 0, as torch starts a parameter with no state;
- a tensor put in place of a state: its values are copied into the flat buffer;
- what cannot be followed is refused, naming the parameter: the state of only some parameters of a
  group removed (the step count, and a global state such as SGDOL's sums, belong to the whole group),
  one state key removed, a key the spec does not keep, two different values for one shared state.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["InstalledState", "StateEdits"]


@dataclass
class StateEdits:
    reset_groups: set[int] = field(default_factory=set)
    replaced: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # by id(param)
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Entry:
    param: torch.Tensor
    group: int
    entry: dict[str, torch.Tensor]
    views: tuple[tuple[str, torch.Tensor], ...]
    shared: frozenset[str]  # keys whose tensor is one for the whole bucket (step count, SCALAR states)


class _Edits:
    """Set by any change to a tracked mapping: checking it costs nothing per step."""

    dirty = False


def _tracked(base: type) -> type:
    """A subclass of dict or defaultdict whose every mutating method marks its :class:`_Edits`."""

    def marking(name: str):
        method = getattr(base, name)

        def mark_then(self, *args, **kwargs):
            self.edits.dirty = True
            return method(self, *args, **kwargs)

        mark_then.__name__ = name
        return mark_then

    def reduce_as_plain(self, protocol):  # a copy or a pickle is a plain dict: nothing tracks it
        if isinstance(self, defaultdict):
            return defaultdict, (self.default_factory, dict(self))
        return dict, (dict(self),)

    names = ("__setitem__", "__delitem__", "__ior__", "clear", "pop", "popitem", "setdefault", "update")
    methods = {name: marking(name) for name in names}
    return type(f"Tracked{base.__name__.capitalize()}", (base,), {**methods, "__reduce_ex__": reduce_as_plain})


_TrackedDict = _tracked(dict)
_TrackedDefaultdict = _tracked(defaultdict)


class InstalledState:
    """The ``state`` mapping handed to the user, with the exact tensors put in it."""

    def __init__(self, entries: list[tuple[torch.Tensor, int, dict[str, torch.Tensor], frozenset[str]]]):
        self._flag = _Edits()
        self.mapping = _TrackedDefaultdict(dict)
        self._entries: list[_Entry] = []
        for param, group, views, shared in entries:
            entry = _TrackedDict(views)
            entry.edits = self._flag
            dict.__setitem__(self.mapping, param, entry)
            self._entries.append(_Entry(param, group, entry, tuple(views.items()), shared))
        self.mapping.edits = self._flag

    def edited(self, state: Any) -> bool:
        """Whether ``state`` was replaced or changed since it was handed out (runs every step: no scan)."""
        return state is not self.mapping or self._flag.dirty

    def edits(self, state: Any, where: Callable[[torch.Tensor], str]) -> StateEdits:
        """What the edits of ``state`` ask for (see the module docs); ``where`` names a parameter."""
        out = StateEdits()
        present: dict[int, list[bool]] = defaultdict(list)
        for e in self._entries:
            present[e.group].append(bool(state.get(e.param)))
        for group, flags in present.items():
            if not any(flags):
                out.reset_groups.add(group)
            elif not all(flags):
                out.problems.append(
                    f"param_groups[{group}]: the state of {flags.count(False)} of its {len(flags)} parameters was "
                    "removed; opdsl keeps one step count (and any global state) per group, so a group's state can "
                    "only be reset whole: remove every parameter's entry of the group, or `optimizer.state.clear()`"
                )
        shared_values: dict[tuple[int, str], tuple[torch.Tensor, str]] = {}
        for e in self._entries:
            if e.group in out.reset_groups or not state.get(e.param):
                continue
            entry, views = state[e.param], dict(e.views)
            for key in entry:
                if key not in views:
                    out.problems.append(
                        f"parameter {where(e.param)}: the spec keeps no state {key!r} (its states: {', '.join(views)})"
                    )
            replaced = {}
            for key, view in views.items():
                if key not in entry:
                    out.problems.append(
                        f"parameter {where(e.param)}: state {key!r} was removed; remove the whole entry "
                        "(`del optimizer.state[p]`) to reset it, or put a tensor in its place"
                    )
                elif entry[key] is not view:
                    replaced[key] = entry[key]
            for key, value in replaced.items():
                if key not in e.shared:
                    continue
                seen = shared_values.setdefault((e.group, key), (value, where(e.param)))
                if seen[0] is not value and not torch.equal(seen[0].detach().cpu(), value.detach().cpu()):
                    out.problems.append(
                        f"state {key!r} is one tensor for all of param_groups[{e.group}], but parameters {seen[1]} "
                        f"and {where(e.param)} were given different values"
                    )
            if replaced:
                out.replaced[id(e.param)] = replaced
        # a shared state given for one parameter goes to every bucket of its group (each keeps its own copy)
        for e in self._entries:
            for (group, key), (value, _) in shared_values.items():
                if e.group == group and key in e.shared:
                    out.replaced.setdefault(id(e.param), {}).setdefault(key, value)
        return out
