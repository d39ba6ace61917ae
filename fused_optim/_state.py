"""State containers that notice replaced entries.

The flat buffers hold the truth only while ``state[p][key]`` is our view. Checking that for every
param on every step would cost more than the rest of ``step()`` together, so the containers flag
writes instead: an entry replaced, deleted or added marks the optimizer dirty, and the next step
copies whatever the state now holds into fresh flat buffers. They pickle and deepcopy as plain
dicts, so a saved state_dict never needs fused_optim to load.
"""

from __future__ import annotations

from collections import defaultdict

_MISSING = object()


class Tracker:
    __slots__ = ("dirty",)

    def __init__(self) -> None:
        self.dirty = False


class ParamState(dict):
    __slots__ = ("_tracker",)

    def __init__(self, tracker: Tracker, *args, **kwargs) -> None:
        dict.__init__(self, *args, **kwargs)
        self._tracker = tracker

    def __setitem__(self, key, value) -> None:
        if dict.get(self, key, _MISSING) is not value:
            self._tracker.dirty = True
        dict.__setitem__(self, key, value)

    def __delitem__(self, key) -> None:
        self._tracker.dirty = True
        dict.__delitem__(self, key)

    def _changed(method):  # a decorator for the methods below
        def wrapper(self, *args, **kwargs):
            self._tracker.dirty = True
            return method(self, *args, **kwargs)

        return wrapper

    clear = _changed(dict.clear)
    pop = _changed(dict.pop)
    popitem = _changed(dict.popitem)
    setdefault = _changed(dict.setdefault)
    update = _changed(dict.update)
    __ior__ = _changed(dict.__ior__)
    del _changed

    def __reduce__(self):
        return (dict, (dict(self),))


class TrackedState(defaultdict):
    def __init__(self, tracker: Tracker, items=()) -> None:
        super().__init__(None)
        self._tracker = tracker
        for key, value in dict(items).items():
            dict.__setitem__(self, key, value if isinstance(value, ParamState) else ParamState(tracker, value))

    def __missing__(self, key):
        value = ParamState(self._tracker)
        dict.__setitem__(self, key, value)
        return value

    def __setitem__(self, key, value) -> None:
        self._tracker.dirty = True
        if not isinstance(value, ParamState) and isinstance(value, dict):
            value = ParamState(self._tracker, value)
        dict.__setitem__(self, key, value)

    def __delitem__(self, key) -> None:
        self._tracker.dirty = True
        dict.__delitem__(self, key)

    def clear(self) -> None:
        self._tracker.dirty = True
        dict.clear(self)

    def pop(self, *args):
        self._tracker.dirty = True
        return dict.pop(self, *args)

    def update(self, *args, **kwargs) -> None:
        self._tracker.dirty = True
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __reduce__(self):
        return (defaultdict, (dict,), None, None, iter((k, dict(v)) for k, v in self.items()))
