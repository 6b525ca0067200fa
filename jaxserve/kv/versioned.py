"""Fully persistent arrays and dicts by rerooting (Baker's "shallow binding" persistent arrays).

A ``Versioned`` object is one version of some mutable containers (numpy arrays, dicts) that all
versions share. Exactly one version — the *current* one — holds the containers (``_data``); every
other version holds a link ``(neighbor, edits)``: its content is the neighbor's content with
``edits`` applied. Deriving a new version from the current one writes its edits in place, in
O(cells touched), and turns the old version into a link holding the cells' old values. Reading an
older version first *reroots*: it walks the links to the current version and applies them one by
one, reversing each link as it goes, so the version read becomes current and every other version
still describes the same content. Consequences (the contract):

* every version stays valid and observably unchanged forever (full persistence), as with immutable
  values; a step costs O(cells it touches), never O(container size);
* switching between two versions costs O(edits between them): cheap for the linear histories
  schedulers produce, and fine for tests that re-run a step from an older state;
* versions share mutable storage, so two versions must not be used from different threads at once,
  and nothing may hold on to a container (or a numpy view of one) across an operation on another
  version: read through ``_read()`` each time and copy what you keep.

Old versions are reclaimed by reference counting as usual: links point from older to newer
versions, so dropping an old state frees its undo records.

Reference: H. G. Baker, "Shallow binding makes functional arrays fast", SIGPLAN Notices 26(8), 1991;
J.-C. Filliâtre and S. Conchon, "A persistent union-find data structure", ML Workshop 2007.
"""

from __future__ import annotations


import numpy as np

MISSING = object()  # as a dict edit's values: delete the keys
WHOLE = object()  # as an edit's keys: replace the container data[slot] itself by values (growth)

# An edit is (slot, keys, values). For a numpy array data[slot], keys is an int, a slice, an int
# array WITHOUT repeated indices (so the write is well defined), or a tuple of those (one per
# axis), and values what to write there. For a dict, keys is a sequence of distinct keys and
# values either a list (insert the keys, which must be absent) or MISSING (delete the keys, which
# must be present); each kind undoes the other, so an undo never has to look a key up twice. With
# keys WHOLE, values (any container) replaces data[slot]: how a table grows. An array edit may carry
# a fourth element, the cells' current values, when its maker read them already (kept for the undo).
Edit = tuple


def apply_edits(data: list, edits: list[Edit]) -> list[Edit]:
    """Applies ``edits`` to ``data`` in order, in place; returns the edits that undo them."""
    undo = []
    for edit in edits:
        slot, keys, values = edit[0], edit[1], edit[2]
        c = data[slot]
        if keys is WHOLE:
            old, data[slot] = c, values
        elif type(c) is np.ndarray:
            if len(edit) == 4:
                old = edit[3]
            else:
                old = c[keys]
                if type(keys) is not np.ndarray and type(old) is np.ndarray:
                    old = old.copy()  # basic indexing gives a view: keep the values, not the cells
            c[keys] = values
        elif values is MISSING:
            old = list(map(c.pop, keys))
        else:
            c.update(zip(keys, values))
            old = MISSING
        undo.append((slot, keys, old))
    undo.reverse()  # a cell written twice must get its oldest value back last
    return undo


class Versioned:
    """Base class of an immutable value backed by rerooted shared containers (see module doc).

    Subclasses keep their small fields (counters, scalars) in their own slots, immutable per
    version, and their large tables in ``_data``, reached only through ``_read()`` and changed only
    through ``_derive()``.
    """

    __slots__ = ("_data", "_link")

    def _read(self) -> list:
        """The shared containers, holding this version's content (rerooting first if needed).
        Valid until an operation on another version: never keep them, or views of them."""
        data = self._data
        if data is None:
            data = _reroot(self)
        return data

    def _derive(self, edits: list[Edit], new: Versioned) -> Versioned:
        """Makes ``new`` (a fresh object carrying the new version's small fields) the current
        version: this version's content plus ``edits``. ``self`` keeps its content. Callers
        validate before deriving, so that a failing operation changes nothing."""
        data = self._read()
        undo = apply_edits(data, edits)
        new._data, new._link = data, None
        self._data, self._link = None, (new, undo)
        return new


def _reroot(v: Versioned) -> list:
    """Makes ``v`` the current version and returns the shared containers."""
    path = []
    while v._data is None:
        path.append(v)
        v = v._link[0]
    data = v._data
    # Walk back from the current version towards the one asked for, reversing each link.
    for node in reversed(path):
        neighbor, edits = node._link
        undo = apply_edits(data, edits)
        neighbor._data, neighbor._link = None, (node, undo)
        node._data, node._link = data, None
    return data
