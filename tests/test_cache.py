"""flexcomp.cache: the one cache and its one eviction rule (owners alive, at most capacity, LRU)."""
import doctest
import gc
import threading
import time
import weakref

import pytest
import torch

import flexcomp.cache as cache_module
from flexcomp.cache import CACHE, Cache

ID_REUSE_ROUNDS = 200  # owners created and destroyed to provoke id reuse
THREADS = 8
MAKE_SECONDS = 0.05  # long enough for the other threads to miss while make() runs


class Owner:
    """A weakly referenceable object of known size (so that ids get reused)."""


def test_doctests():
    assert doctest.testmod(cache_module).failed == 0


def test_get_put_and_default():
    c = Cache()
    assert c.get("k") is None and c.get("k", 7) == 7
    assert c.put("k", 1) == 1
    assert c.get("k") == 1 and "k" in c and len(c) == 1
    c.put("k", 2)  # replaces
    assert c.get("k") == 2 and len(c) == 1


def test_capacity_drops_least_recently_used():
    c = Cache(capacity=3)
    for k in "abc":
        c.put(k, k.upper())
    assert c.get("a") == "A"  # a is now the most recent: b is the oldest
    c.put("d", "D")
    assert len(c) == 3 and "b" not in c and all(k in c for k in "acd")
    assert "c" in c  # __contains__ does not refresh c
    c.put("e", "E")
    assert "c" not in c and all(k in c for k in "ade")


def test_put_refreshes_a_replaced_key():
    c = Cache(capacity=2)
    c.put("a", 1)
    c.put("b", 2)
    c.put("a", 3)  # a most recent again
    c.put("c", 4)
    assert "b" not in c and c.get("a") == 3


def test_bad_capacity_is_refused():
    with pytest.raises(ValueError, match="capacity"):
        Cache(capacity=0)


def test_owner_death_drops_its_entries():
    c = Cache()
    o, other = Owner(), Owner()
    c.put(("x", id(o)), "one", owners=(o,))
    c.put(("y", id(o)), "two", owners=(o, other))
    c.put("kept", "three", owners=(other,))
    assert len(c) == 3
    del o
    gc.collect()
    assert len(c) == 1 and c.get("kept") == "three"


def test_owner_death_inside_a_cycle_drops_its_entries():
    c = Cache()
    o = Owner()
    o.self = o  # only the cycle collector frees it
    c.put(("x", id(o)), "v", owners=(o,))
    del o
    gc.collect()
    assert len(c) == 0


def test_tensor_owner_is_not_kept_alive():
    c = Cache()
    t = torch.randn(4)
    ref = weakref.ref(t)
    c.put(("t", id(t)), "derived", owners=(t,))
    del t
    gc.collect()
    assert ref() is None and len(c) == 0


def test_value_is_released_with_its_entry():
    c = Cache()
    o, value = Owner(), Owner()
    ref = weakref.ref(value)
    c.put("k", value, owners=(o,))
    del value, o
    gc.collect()
    assert ref() is None


def test_id_in_key_is_never_stale():
    c = Cache()
    seen = set()
    for i in range(ID_REUSE_ROUNDS):
        o = Owner()
        assert c.get(("id", id(o))) is None  # never the value of a dead owner with the same id
        c.put(("id", id(o)), i, owners=(o,))
        seen.add(id(o))
        del o
    assert len(seen) < ID_REUSE_ROUNDS  # ids were reused, so the check above meant something
    gc.collect()
    assert len(c) == 0


def test_id_reuse_without_collection_between():
    c = Cache()
    hits = 0
    for i in range(ID_REUSE_ROUNDS):
        o = Owner()
        hits += c.get(("id", id(o))) is not None
        c.put(("id", id(o)), i, owners=(o,))
    assert hits == 0


def test_one_finalizer_per_owner():
    c = Cache()
    o = Owner()
    for i in range(10):
        c.put(("k", i), i, owners=(o,))
    assert len(c._finalizers) == 1
    f = c._finalizers[id(o)]
    assert f.atexit is False
    for i in range(10):
        c.discard(("k", i))
    assert not f.alive and not c._finalizers  # an owner with no entries left is no longer watched


def test_repeated_owner_counts_once():
    c = Cache()
    o = Owner()
    c.put("k", 1, owners=(o, o))
    del o
    gc.collect()
    assert len(c) == 0


def test_lru_eviction_stops_watching_owner():
    c = Cache(capacity=1)
    o = Owner()
    c.put("a", 1, owners=(o,))
    c.put("b", 2)
    assert "a" not in c and not c._finalizers


def test_get_or_make_calls_make_once():
    c = Cache()
    calls = []

    def make():
        calls.append(1)
        return "made"

    o = Owner()
    assert c.get_or_make("k", make, owners=(o,)) == "made"
    assert c.get_or_make("k", make, owners=(o,)) == "made"
    assert len(calls) == 1
    del o
    gc.collect()
    assert c.get_or_make("k", make) == "made" and len(calls) == 2  # the owner died: made again


def test_get_or_make_once_across_threads():
    c = Cache()
    calls = []
    start = threading.Barrier(THREADS)
    results = []

    def make():
        calls.append(1)
        time.sleep(MAKE_SECONDS)
        return object()

    def worker():
        start.wait()
        results.append(c.get_or_make("k", make))

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len({id(r) for r in results}) == 1


def test_get_or_make_failure_keeps_nothing():
    c = Cache()

    def fail():
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        c.get_or_make("k", fail)
    assert "k" not in c and c.get_or_make("k", lambda: 1) == 1


def test_get_or_make_reentrant_make_does_not_deadlock():
    c = Cache()

    def make():
        return c.get_or_make("inner", lambda: 2) + 1

    assert c.get_or_make("outer", make) == 3 and c.get("inner") == 2


def test_non_weakrefable_owner_is_refused():
    c = Cache()
    for bad in (1, (1, 2), "s"):
        with pytest.raises(TypeError, match=type(bad).__qualname__):
            c.put("k", 1, owners=(bad,))
    with pytest.raises(TypeError, match="tuple"):
        c.put("k", 1, owners=Owner())  # owners is a tuple, not one object
    assert len(c) == 0


def test_discard_and_clear():
    c = Cache()
    o = Owner()
    c.put("a", 1, owners=(o,))
    c.put("b", 2)
    c.discard("a")
    c.discard("missing")
    assert "a" not in c and len(c) == 1
    c.put("a", 1, owners=(o,))
    c.clear()
    assert len(c) == 0 and not c._finalizers and not c._by_owner
    del o
    gc.collect()
    assert len(c) == 0


def test_finalizer_that_uses_the_cache_does_not_deadlock():
    c = Cache()

    class Touchy:
        def __del__(self):
            c.get("anything")  # runs when its entry is dropped

    o = Owner()
    c.put("k", Touchy(), owners=(o,))
    del o
    gc.collect()
    c.put("k2", Touchy())
    c.discard("k2")
    assert len(c) == 0


def test_dead_cache_ignores_owner_death():
    c = Cache()
    o = Owner()
    c.put("k", 1, owners=(o,))
    del c
    gc.collect()
    del o  # its finalizer finds no cache
    gc.collect()


def test_process_wide_cache():
    assert isinstance(CACHE, Cache)
    o = Owner()
    key = ("test", id(o))
    CACHE.put(key, 1, owners=(o,))
    assert key in CACHE
    CACHE.discard(key)
    assert key not in CACHE
