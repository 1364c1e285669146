"""GPU benchmark of ``attn_implementation="flexcomp"`` in HF transformers beside SDPA and
transformers' own ``flex_attention`` path, in one run (random-init weights, nothing downloaded).

    python -m flexcomp.bench_transformers            # 4-layer Llama, hidden 2048, batch 4 x 4096, bf16

For each implementation: the logits' relative difference to SDPA's, the median time of a model
forward + backward (``loss.backward()`` on the LM loss), with ``--compile`` also under
``torch.compile(model, fullgraph=True)``, and 20 greedy tokens generated with a KV cache from a
256-token prompt (how many equal SDPA's). transformers' flex path needs a working
``torch.compile``; a step that raises is reported, the others still run.
Not a test: it prints numbers; docs/performance.md keeps them with date, device and command.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

LAYERS, HIDDEN, HEADS, KV_HEADS, VOCAB = 4, 2048, 16, 8, 32000
BATCH, SEQ, PROMPT, NEW_TOKENS = 4, 4096, 256, 20
IMPLEMENTATIONS = ("sdpa", "flexcomp", "flex_attention")


def _model(dtype: torch.dtype):
    import transformers

    import flexcomp.integrations.transformers  # noqa: F401  (registers "flexcomp")

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
                                   num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                   max_position_embeddings=2 * SEQ)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to("cuda", dtype)


def _time(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=3, rep=30, return_mode="median")


def run(dtype: torch.dtype, compiled: bool = False, implementations=IMPLEMENTATIONS) -> list[dict]:
    model = _model(dtype)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), device="cuda")
    prompt = ids[:, :PROMPT]
    rows, want_logits, want_tokens = [], None, None
    for impl in implementations:
        row = {"implementation": impl}
        try:
            model.set_attn_implementation(impl)
            model.eval()
            with torch.no_grad():
                logits = model(input_ids=ids[:1, :1024]).logits.float()
                tokens = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                        max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                        pad_token_id=0)[:, PROMPT:]
            if want_logits is None:
                want_logits, want_tokens = logits, tokens
            row["logits_rel_diff_vs_sdpa"] = float((logits - want_logits).norm() / want_logits.norm())
            row["tokens_equal_to_sdpa"] = f"{int((tokens == want_tokens).sum())}/{tokens.numel()}"
            model.train()

            def step():
                model.zero_grad(set_to_none=True)
                model(input_ids=ids, labels=ids).loss.backward()

            row["fwd_bwd_ms"] = _time(step)
            if compiled:  # the same step with the model under torch.compile(fullgraph=True), default backend
                torch._dynamo.reset()
                fast = torch.compile(model, fullgraph=True)

                def compiled_step():
                    model.zero_grad(set_to_none=True)
                    fast(input_ids=ids, labels=ids).loss.backward()

                row["compiled_fwd_bwd_ms"] = _time(compiled_step)
                model.eval()
                with torch.no_grad():
                    got = fast(input_ids=ids[:1, :1024]).logits.float()
                row["compiled_logits_rel_diff_vs_sdpa"] = float((got - want_logits).norm() / want_logits.norm())
                model.train()
        except Exception as e:  # reported, the other implementations still run
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--compile", action="store_true",
                   help="also time forward + backward under torch.compile(model, fullgraph=True)")
    p.add_argument("--implementations", default=",".join(IMPLEMENTATIONS),
                   help="comma-separated, from " + ", ".join(IMPLEMENTATIONS) + " (sdpa first: the others compare to "
                        "it)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("flexcomp.bench_transformers needs a CUDA GPU (torch.cuda.is_available() is False)")
    rows = run(getattr(torch, a.dtype), a.compile, tuple(a.implementations.split(",")))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "device": torch.cuda.get_device_name()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
