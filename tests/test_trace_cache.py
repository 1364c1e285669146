"""The trace cache never serves a stale trace: everything a trace bakes in is in its fingerprint.

Each test changes one way a mod can reach state between two calls and checks the second mask is
the new one (against torch's create_mask, which calls the mod afresh).
"""
import sys
import types

import torch
from torch.nn.attention import flex_attention as tfa

from flexcomp import create_block_mask, create_mask
from flexcomp.ir import ModKind
from flexcomp.trace import trace

N = 12


def _check(mod):
    assert torch.equal(create_mask(mod, 1, 1, N, N, device="cpu"), tfa.create_mask(mod, 1, 1, N, N, device="cpu"))


def _check_blocks(mod):
    ours = create_block_mask(mod, 1, 1, 64, 64, device="cpu", BLOCK_SIZE=16)
    assert torch.equal(ours.to_dense(), tfa.create_block_mask(mod, 1, 1, 64, 64, device="cpu", BLOCK_SIZE=16).to_dense())


class Cfg:
    WINDOW = 3

    class Inner:
        SHIFT = 1


def _class_attr(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx < Cfg.WINDOW) & (q_idx >= kv_idx + Cfg.Inner.SHIFT)


def test_class_attribute_change_retraces():
    _check(_class_attr)
    Cfg.WINDOW = 6
    _check(_class_attr)
    Cfg.Inner.SHIFT = 0
    _check(_class_attr)


def test_module_attribute_change_retraces():
    cfg = types.ModuleType("flexcomp_test_cfg")
    cfg.WINDOW = 2
    sys.modules[cfg.__name__] = cfg
    ns = {"cfg": cfg}
    exec("def mod(b, h, q_idx, kv_idx):\n    return (q_idx - kv_idx).abs() < cfg.WINDOW\n", ns)
    mod = ns["mod"]
    _check(mod)
    cfg.WINDOW = 5
    _check(mod)


def test_keyword_only_and_positional_defaults_retrace():
    def kw(b, h, q_idx, kv_idx, *, window=2):
        return (q_idx - kv_idx).abs() < window

    _check(kw)
    kw.__kwdefaults__["window"] = 7
    _check(kw)

    def pos(b, h, q_idx, kv_idx, window=2):
        return (q_idx - kv_idx).abs() < window

    _check_blocks(pos)
    pos.__defaults__ = (20,)
    _check_blocks(pos)


LIMITS = {"window": 2}
OFFSETS = [1, 2]
SCALE = 3


def _global_containers(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx < LIMITS["window"]) & (q_idx >= kv_idx - OFFSETS[1]) & (q_idx * SCALE >= kv_idx)


def test_global_dict_list_and_number_changes_retrace():
    global SCALE
    _check(_global_containers)
    LIMITS["window"] = 9
    _check(_global_containers)
    OFFSETS[1] = 0
    _check(_global_containers)
    SCALE = 1
    _check(_global_containers)


def test_objects_read_through_self_retrace_every_call():
    class Masker:
        def __init__(self):
            self.window = 2

        def mask_mod(self, b, h, q_idx, kv_idx):
            return (q_idx - kv_idx).abs() < self.window

    def expect(window):  # torch's create_mask does not take bound methods: the same mask as a function
        return tfa.create_mask(lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).abs() < window, 1, 1, N, N, device="cpu")

    m = Masker()
    assert torch.equal(create_mask(m.mask_mod, 1, 1, N, N, device="cpu"), expect(2))
    m.window = 8
    assert torch.equal(create_mask(m.mask_mod, 1, 1, N, N, device="cpu"), expect(8))


def test_cache_hits_when_nothing_changed():
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    assert trace(causal, ModKind.MASK).graph is trace(causal, ModKind.MASK).graph


def test_int32_capture_growing_past_its_proven_range_retraces():
    start = torch.zeros(N, dtype=torch.int32)

    def rel(b, h, q_idx, kv_idx):
        return (q_idx - start[q_idx]) * 16 >= kv_idx * 16

    first = trace(rel, ModKind.MASK).graph
    assert "i64" not in str(first)
    _check(rel)
    start.fill_(-(2 ** 30))  # in place: (q - start) * 16 now leaves int32; torch computes it in int64
    assert "i64" in str(trace(rel, ModKind.MASK).graph)
    _check(rel)


WIDTH = 2


def _user_window(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).abs() < WIDTH


def test_library_combinators_see_user_functions_change():
    """and_masks is library code, but its closure holds the user's function, whose globals change."""
    global WIDTH
    from flexcomp import and_masks
    from flexcomp.masks import causal_mask

    both = and_masks(causal_mask, _user_window)
    _check(both)
    WIDTH = 5
    _check(both)


def test_bound_methods_classmethods_globals_by_name_and_value_reads_never_go_stale():
    class Obj:
        def __init__(self):
            self.window = 2

        def mask_mod(self, b, h, q_idx, kv_idx):
            return (q_idx - kv_idx).abs() < self.window

    def expect(window):
        return tfa.create_mask(lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).abs() < window, 1, 1, N, N, device="cpu")

    obj = Obj()
    assert torch.equal(create_mask(obj.mask_mod, 1, 1, N, N, device="cpu"), expect(2))
    obj.window = 6
    assert torch.equal(create_mask(obj.mask_mod, 1, 1, N, N, device="cpu"), expect(6))

    class WithCls:
        w = 3

        @classmethod
        def mask_mod(cls, b, h, q_idx, kv_idx):
            return (q_idx - kv_idx).abs() < cls.w

    assert torch.equal(create_mask(WithCls.mask_mod, 1, 1, N, N, device="cpu"), expect(3))
    WithCls.w = 5
    assert torch.equal(create_mask(WithCls.mask_mod, 1, 1, N, N, device="cpu"), expect(5))

    win = torch.tensor(2)

    def reads_value(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() < int(win)  # the value is baked into the trace

    _check(reads_value)
    win.fill_(9)
    _check(reads_value)


def _by_name(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).abs() < globals()["WIDTH"] + getattr(Cfg, "WINDOW") * 0


def test_names_looked_up_by_string_and_resized_tensors_retrace():
    global WIDTH
    _check(_by_name)
    WIDTH = 8
    _check(_by_name)
    table = torch.arange(N) % 3

    def reads_shape(b, h, q_idx, kv_idx):
        return table[q_idx] == table[kv_idx] + table.shape[0] * 0

    _check(reads_shape)
    table.resize_(N + 4)
    table.copy_(torch.arange(N + 4) % 2)
    _check(reads_shape)


# ---- closures of the same code over other tensors: the trace is rebound, never stale -------------
def _doc_mask(doc):
    def document(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)
    return document


def _count_traces(monkeypatch) -> list:
    from flexcomp import trace as trace_module

    runs = []
    real = trace_module.Tracer.run

    def run(self):
        runs.append(1)
        return real(self)

    monkeypatch.setattr(trace_module.Tracer, "run", run)
    return runs


def test_new_closure_over_new_tensors_reuses_the_trace(monkeypatch):
    runs = _count_traces(monkeypatch)
    docs = [torch.randint(0, 3, (N,)).sort().values.to(torch.int32) for _ in range(4)]
    first = trace(_doc_mask(docs[0]), ModKind.MASK)
    assert len(runs) == 1
    for doc in docs[1:]:
        tm = trace(_doc_mask(doc), ModKind.MASK)
        assert tm.graph is first.graph and tm.buffers[0] is doc  # rebound: this closure's tensor
        _check(_doc_mask(doc))
    assert len(runs) == 1


def test_rebinding_keeps_the_pattern_of_shared_tensors(monkeypatch):
    def pair(a, c):
        def mod(b, h, q_idx, kv_idx):
            return a[q_idx] >= c[kv_idx]
        return mod

    x = torch.randint(0, 5, (N,))
    trace(pair(x, x), ModKind.MASK)  # one tensor captured twice
    y, z = torch.randint(0, 5, (N,)), torch.randint(0, 5, (N,))
    _check(pair(y, z))  # two different tensors: not the one-buffer trace
    tm = trace(pair(y, z), ModKind.MASK)
    assert len(tm.buffers) == 2 and tm.buffers[0] is y and tm.buffers[1] is z


def test_a_value_read_while_tracing_is_never_rebound():
    def limit(t):
        def mod(b, h, q_idx, kv_idx):
            return kv_idx < int(t.max())  # t's value baked into the trace
        return mod

    _check(limit(torch.tensor([3, 1])))
    _check(limit(torch.tensor([7, 2])))
    _check(limit(torch.tensor([2])))


def test_a_tensor_derived_while_tracing_is_never_rebound():
    def shifted(t):
        def mod(b, h, q_idx, kv_idx):
            return (t + 1)[q_idx] > kv_idx  # a new tensor each trace, made from t's values
        return mod

    _check(shifted(torch.arange(N)))
    _check(shifted(torch.arange(N) * 2 - 5))


def test_rebound_int32_capture_outside_the_proven_range_retraces():
    def rel(start):
        def mod(b, h, q_idx, kv_idx):
            return (q_idx - start[q_idx]) * 16 >= kv_idx * 16
        return mod

    assert "i64" not in str(trace(rel(torch.zeros(N, dtype=torch.int32)), ModKind.MASK).graph)
    wide = torch.full((N,), -(2 ** 30), dtype=torch.int32)
    assert "i64" in str(trace(rel(wide), ModKind.MASK).graph)
    _check(rel(wide))


def test_captures_only_compared_are_never_read_again(monkeypatch):
    """int32 captures the mod only compares cannot make its arithmetic wrap: a new closure over new
    tensors (a new packing) rebinds the trace without reading their values (no device sync); one the
    mod computes with (``q - start[q]``) is read, once per new tensor."""
    import flexcomp.trace_cache as trace_cache

    reads = []
    real = trace_cache.value_ranges
    monkeypatch.setattr(trace_cache, "value_ranges", lambda ts: (reads.append(len(ts)) if ts else None) or real(ts))

    def compared(doc):
        return lambda b, h, q_idx, kv_idx: (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    def computed(start):
        return lambda b, h, q_idx, kv_idx: (q_idx - start[q_idx]) * 16 >= kv_idx * 16

    for make, want in ((compared, []), (computed, [1, 1, 1])):
        trace(make(torch.zeros(N, dtype=torch.int32)), ModKind.MASK)  # the first trace of the structure
        reads.clear()
        for i in range(3):
            _check(make(torch.arange(N, dtype=torch.int32) // 4 + i))
        assert reads == want, make.__name__  # a read (of one tensor) per new closure, or none


def test_views_taken_while_tracing_are_cached_and_rebound(monkeypatch):
    """``offset[0]`` / ``table[1:]`` inside the mod: views of a captured tensor, read at run time, so the
    trace is kept (one trace for many closures) and sees in-place writes and each closure's tensor."""
    runs = _count_traces(monkeypatch)

    def shifted(offset, table):
        def mod(b, h, q_idx, kv_idx):
            return (q_idx + offset[0] >= kv_idx) & (table[1:][kv_idx] > 0)
        return mod

    offset, table = torch.tensor([0]), torch.randint(0, 3, (N + 1,))
    _check(shifted(offset, table))
    offset[0] = 3  # an in-place write: seen without a new trace
    _check(shifted(offset, table))
    for _ in range(3):  # new tensors: rebound, no new trace
        _check(shifted(torch.randint(-4, 4, (1,)), torch.randint(0, 3, (N + 1,))))
    _check(shifted(torch.tensor([[2, 5]])[:, 1], table))  # a strided capture: its own views
    assert len(runs) <= 2
