"""The one cache of flexcomp, with one eviction rule.

Every stage caches in :data:`CACHE`, under keys that start with the stage's namespace string:
``("trace", ...)``, ``("simplify", ...)``, ``("plan", ...)``, ``("kernel", ...)``.

The rule: **an entry lives while every one of its owners lives, and the cache keeps at most
``capacity`` entries, dropping the least recently used.** Owners are the objects an entry was
derived from (captured tensors, a BlockMask, a user function); the cache holds them weakly, never
keeping one alive, and when one dies (``weakref.finalize``) every entry registered with it goes.
An entry with no owners lives until the LRU bound drops it (or :meth:`Cache.discard` /
:meth:`Cache.clear`).

Keys may contain ``id(owner)`` for an owner of that entry: an id cannot be reused while its object
lives, and the entry dies with the object, so an id in a key is never stale (a new object that
happens to get the same id finds no entry). Owners that cannot be weakly referenced (ints,
tuples, ...) are refused with a :class:`TypeError`.

Thread safety: one lock guards the cache. Finalizers may run at any time (at any allocation,
including inside :meth:`Cache.put` on the thread holding the lock), so a finalizer never waits
for the lock: it records the dead owner, and the record is processed before the next operation
reads the cache (or at once, if the lock is free). Values dropped by the cache are released after
the lock is let go, so their own finalizers and ``__del__`` may use the cache. ``make()`` in
:meth:`Cache.get_or_make` runs without the lock.

>>> class Owner:
...     pass
>>> cache = Cache(capacity=2)
>>> o = Owner()
>>> cache.put(("demo", id(o)), "derived from o", owners=(o,))
'derived from o'
>>> cache.get(("demo", id(o)))
'derived from o'
>>> del o  # the owner dies: its entries go with it
>>> len(cache)
0
"""
from __future__ import annotations

import collections
import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Any

DEFAULT_CAPACITY = 4096  # entries kept by a cache at most (the least recently used dropped first)


def _owner_died(cache_ref: weakref.ReferenceType[Cache], owner_id: int) -> None:
    """Finalizer of an owner: record its death in the cache (if the cache still exists)."""
    cache = cache_ref()
    if cache is not None:
        cache._owner_died(owner_id)


class Cache:
    """A thread-safe LRU cache whose entries die with their owners (see the module docstring).

    >>> cache = Cache(capacity=2)
    >>> cache.put("a", 1), cache.put("b", 2)
    (1, 2)
    >>> cache.get("a")  # "a" is now the most recently used
    1
    >>> cache.put("c", 3)  # over capacity: the least recently used ("b") is dropped
    3
    >>> sorted(k for k in ("a", "b", "c") if k in cache)
    ['a', 'c']
    >>> cache.get_or_make("d", lambda: 4), cache.get_or_make("d", lambda: 5)
    (4, 4)
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        """An empty cache keeping at most ``capacity`` (>= 1) entries."""
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"Cache capacity must be a positive int, got {capacity!r}")
        self.capacity = capacity
        self._lock = threading.Lock()
        # key -> (value, ids of its owners); order is recency, the most recent last
        self._entries: collections.OrderedDict[Hashable, tuple[Any, tuple[int, ...]]] = collections.OrderedDict()
        self._by_owner: dict[int, set] = {}  # owner id -> keys of the entries it owns
        self._finalizers: dict[int, weakref.finalize] = {}  # owner id -> its one finalizer for this cache
        self._dead: collections.deque[int] = collections.deque()  # ids of owners that died, not yet processed
        self._making: dict[Hashable, tuple[threading.Lock, int]] = {}  # key -> (lock, thread) of a running make()

    # -- public API ------------------------------------------------------------------------------

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The value under ``key`` (now the most recently used), or ``default``."""
        hit = self._fast_get(key)
        if hit is not _MISSING:
            return hit
        garbage: list = []
        with self._lock:
            self._drain(garbage)
            entry = self._entries.get(key)
            if entry is None:
                return default
            self._entries.move_to_end(key)
            return entry[0]

    def _fast_get(self, key: Hashable) -> Any:
        """A hit without the lock, when no owner's death waits to be processed (then every entry
        whose key holds a dead owner's id is gone already; the GIL makes each dict step atomic).
        :data:`_MISSING` otherwise: the caller takes the locked path. Host time per call matters."""
        if self._dead:
            return _MISSING
        entry = self._entries.get(key)
        if entry is None:
            return _MISSING
        try:
            self._entries.move_to_end(key)
        except KeyError:  # dropped by another thread meanwhile: still a valid value
            pass
        return entry[0]

    def put(self, key: Hashable, value: Any, owners: tuple = ()) -> Any:
        """Keep ``value`` under ``key`` while every one of ``owners`` lives; returns ``value``.

        Replaces an entry already under ``key``. Raises :class:`TypeError` if an owner cannot be
        weakly referenced. The least recently used entries are dropped beyond ``capacity``."""
        owners = _unique(owners)
        for owner in owners:
            _check_owner(owner)
        garbage: list = []
        with self._lock:
            self._drain(garbage)
            if key in self._entries:
                garbage.append(self._remove(key))
            ids = tuple(id(o) for o in owners)
            for owner, oid in zip(owners, ids):
                self._watch(owner, oid, garbage)
                self._by_owner.setdefault(oid, set()).add(key)
            self._entries[key] = (value, ids)
            while len(self._entries) > self.capacity:
                oldest = next(iter(self._entries))
                garbage.append(self._remove(oldest))
            self._drain(garbage)
        del garbage  # released without the lock: their finalizers may use the cache
        return value

    def get_or_make(self, key: Hashable, make: Callable[[], Any], owners: tuple = ()) -> Any:
        """The value under ``key``; on a miss, ``make()`` (called without the lock) is kept with
        ``owners`` (as :meth:`put`) and returned.

        ``make()`` runs once per key: a thread that misses while another thread is making the same
        key waits for it and takes its value. (If ``make()`` raises, nothing is kept and a waiting
        thread tries its own ``make()``; a ``make()`` that asks for its own key calls ``make()``
        again rather than waiting for itself.)"""
        hit = self._fast_get(key)
        if hit is not _MISSING:
            return hit
        owners = _unique(owners)
        for owner in owners:
            _check_owner(owner)  # before make(), not after it
        me = threading.get_ident()
        while True:
            with self._lock:
                garbage: list = []
                self._drain(garbage)
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    return entry[0]
                making = self._making.get(key)
                if making is None:
                    lock = threading.Lock()
                    lock.acquire()
                    self._making[key] = (lock, me)
            del garbage
            if making is None:
                break
            lock, thread = making
            if thread == me:  # make() asked for its own key: no waiting for ourselves
                return self.put(key, make(), owners)
            with lock:  # wait for the other thread's make() to finish, then look again
                pass
        try:
            return self.put(key, make(), owners)
        finally:
            with self._lock:
                self._making.pop(key, None)
            lock.release()

    def discard(self, key: Hashable) -> None:
        """Drop the entry under ``key``, if any."""
        garbage: list = []
        with self._lock:
            self._drain(garbage)
            if key in self._entries:
                garbage.append(self._remove(key))
        del garbage

    def clear(self) -> None:
        """Drop every entry (and stop watching their owners)."""
        with self._lock:
            garbage = [value for value, _ in self._entries.values()]
            self._entries.clear()
            self._by_owner.clear()
            self._dead.clear()
            for f in self._finalizers.values():
                f.detach()  # only unregisters it: nothing of ours runs
            self._finalizers.clear()
        del garbage

    def __len__(self) -> int:
        """How many entries the cache holds."""
        garbage: list = []
        with self._lock:
            self._drain(garbage)
            return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        """Whether an entry is under ``key`` (without making it the most recently used)."""
        garbage: list = []
        with self._lock:
            self._drain(garbage)
            return key in self._entries

    def __repr__(self) -> str:
        return f"Cache({len(self)} of {self.capacity} entries)"

    # -- internals (called with the lock held, except _owner_died) ------------------------------

    def _owner_died(self, owner_id: int) -> None:
        """An owner died (a finalizer, at any time, on any thread): record it; process it now
        only if the lock is free (never wait for it: this thread may be the one holding it)."""
        self._dead.append(owner_id)
        if not self._lock.acquire(blocking=False):
            return  # the holder, or the next operation, processes it
        garbage: list = []
        try:
            self._drain(garbage)
        finally:
            self._lock.release()
        del garbage

    def _drain(self, garbage: list) -> None:
        """Drop the entries of owners that died; their values go to ``garbage``."""
        while self._dead:
            oid = self._dead[0]  # popped only once its entries are gone: the lock-free path checks _dead
            self._finalizers.pop(oid, None)
            for key in self._by_owner.pop(oid, ()):
                if key in self._entries:
                    garbage.append(self._remove(key))
            self._dead.popleft()

    def _remove(self, key: Hashable) -> Any:
        """Drop the entry under ``key`` and return its value; owners left with no entry are no
        longer watched."""
        value, ids = self._entries.pop(key)
        for oid in ids:
            keys = self._by_owner.get(oid)
            if keys is None:
                continue
            keys.discard(key)
            if not keys:
                del self._by_owner[oid]
                f = self._finalizers.pop(oid, None)
                if f is not None:
                    f.detach()
        return value

    def _watch(self, owner: Any, oid: int, garbage: list) -> None:
        """Make sure ``owner`` has its one finalizer for this cache."""
        f = self._finalizers.get(oid)
        if f is not None:
            info = f.peek()
            if info is not None and info[0] is owner:
                return
            # a finalizer for a former object with this id, whose death is not processed yet
            self._dead.append(oid)
            self._drain(garbage)
        f = weakref.finalize(owner, _owner_died, weakref.ref(self), oid)
        f.atexit = False  # nothing to do at exit: the process's memory goes anyway
        self._finalizers[oid] = f


_MISSING = object()  # what _fast_get returns when the locked path must answer


def _unique(owners: tuple) -> tuple:
    """``owners`` without repeats (by identity), in order."""
    if not isinstance(owners, (tuple, list)):
        raise TypeError(f"Cache owners must be a tuple of objects, got {type(owners).__name__}")
    seen: dict[int, Any] = {}
    for o in owners:
        seen.setdefault(id(o), o)
    return tuple(seen.values())


def _check_owner(owner: Any) -> None:
    """Refuse an owner that cannot be weakly referenced, naming its type."""
    try:
        weakref.ref(owner)
    except TypeError:
        raise TypeError(
            f"a Cache owner must be weakly referenceable (a tensor, a BlockMask, a function, ...); "
            f"{type(owner).__module__}.{type(owner).__qualname__} is not") from None


CACHE = Cache()
"""The process-wide cache every stage uses; keys start with the stage's namespace string."""
