"""CPU benchmark: flexcomp's reference backend beside ``F.scaled_dot_product_attention`` on the
same CPU, in one run (the issues' CPU goals).

    python -m flexcomp.bench_cpu
    python -m flexcomp.bench_cpu --model   # also a small Llama's training step (needs transformers)

Cases: ``decode``, one query token of ``DECODE`` heads against a cache (GQA), forward; ``causal
train``, ``TRAIN`` causal, forward + backward (``torch.autograd.grad``). Each is timed in
``ROUNDS`` alternating rounds (SDPA, flexcomp, SDPA, ...; the machine's noise moves both alike);
the table gives the medians and the median of the per-round ratios. ``--model``: a random-init
``MODEL`` Llama's training step (forward + LM-loss backward) with ``attn_implementation="flexcomp"``
against ``"sdpa"``, plain and with two left-padded sequences.
Not a test: it prints numbers; docs/performance.md keeps them with date, machine and command.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

DECODE = dict(B=1, H=8, HKV=2, L=1, S=4096, D=64)  # issue 10: within 1.5x of SDPA
TRAIN = dict(B=2, H=4, S=2048, D=64)  # issue 14: within 1.3x of SDPA
ROUNDS = 7
MODEL = dict(hidden=256, layers=4, heads=4, kv_heads=2, batch=4, seq=1024, vocab=1000)


def _time(fn, calls: int) -> float:
    """Milliseconds per call over ``calls`` calls after two warm-up calls."""
    fn()
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e3


def _rounds(name: str, ours, theirs, calls: int) -> dict:
    pairs = [(_time(theirs, calls), _time(ours, calls)) for _ in range(ROUNDS)]
    return {"case": name, "sdpa_ms": statistics.median(a for a, _ in pairs),
            "flexcomp_ms": statistics.median(b for _, b in pairs), "ratio": statistics.median(b / a for a, b in pairs)}


def _model_rows() -> list[dict]:
    import transformers

    import flexcomp.integrations.transformers  # noqa: F401  (registers "flexcomp")

    c = MODEL
    cfg = transformers.LlamaConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=4 * c["hidden"],
                                   num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                                   num_key_value_heads=c["kv_heads"], max_position_embeddings=2 * c["seq"])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    ids = torch.randint(0, c["vocab"], (c["batch"], c["seq"]))
    padded = torch.ones_like(ids)
    padded[1, :c["seq"] // 10] = 0
    padded[-1, :c["seq"] // 3] = 0

    def step(impl: str, mask):
        def run():
            model.set_attn_implementation(impl)
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        return run

    name = f"Llama {c['layers']}x{c['hidden']} ({c['heads']}/{c['kv_heads']} heads) train step {c['batch']}x{c['seq']}"
    return [_rounds(name, step("flexcomp", None), step("sdpa", None), calls=1),
            _rounds(name + ", 2 left-padded", step("flexcomp", padded), step("sdpa", padded), calls=1)]


def main(argv=None) -> int:
    import flexcomp
    from flexcomp.masks import causal_mask

    argv = sys.argv[1:] if argv is None else argv

    c = DECODE
    q = torch.randn(c["B"], c["H"], c["L"], c["D"])
    k, v = (torch.randn(c["B"], c["HKV"], c["S"], c["D"]) for _ in range(2))
    rows = [_rounds(f"decode {c['B']}x{c['H']}x{c['L']}x{c['D']} vs {c['S']} (GQA {c['H']}/{c['HKV']})",
                    lambda: flexcomp.flex_attention(q, k, v, enable_gqa=True),
                    lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), calls=200)]
    c = TRAIN
    q, k, v = (torch.randn(c["B"], c["H"], c["S"], c["D"], requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    bm = flexcomp.create_block_mask(causal_mask, 1, 1, c["S"], c["S"], device="cpu")
    rows.append(_rounds(f"causal train {c['B']}x{c['H']}x{c['S']}x{c['D']} fwd+bwd",
                        lambda: torch.autograd.grad(flexcomp.flex_attention(q, k, v, block_mask=bm), (q, k, v), do),
                        lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v),
                                                    do), calls=3))
    if "--model" in argv:
        rows += _model_rows()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| case | SDPA ms | flexcomp ms | ratio (median of rounds) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['sdpa_ms']:.3f} | {r['flexcomp_ms']:.3f} | {r['ratio']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
