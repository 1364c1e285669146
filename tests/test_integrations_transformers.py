"""attn_implementation="flexcomp" in HF transformers: small random-init models against SDPA (eager for
Gemma-2) in float32 on the CPU, nothing downloaded.

Each model runs once with transformers' own implementation and once with flexcomp's, same weights:
logits (no padding, left and right padding, packed sequences from ``position_ids``), 20 greedy
tokens generated with a KV cache, and a training step's loss and every parameter's gradient.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")
fct = pytest.importorskip("flexcomp.integrations.transformers")

from flexcomp import BlockMask  # noqa: E402

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def _configs():
    yield "llama", transformers.LlamaConfig(**SMALL), "sdpa"
    yield "mistral", transformers.MistralConfig(**SMALL, sliding_window=12), "sdpa"
    yield "gemma2", transformers.Gemma2Config(**SMALL, head_dim=16, sliding_window=12, attn_logit_softcapping=20.0,
                                              final_logit_softcapping=None, query_pre_attn_scalar=24), "eager"
    yield "qwen2", transformers.Qwen2Config(**SMALL), "sdpa"
    yield "phi", transformers.PhiConfig(**{**SMALL, "num_key_value_heads": 4}), "sdpa"


CONFIGS = {name: (cfg, ref) for name, cfg, ref in _configs()}


def _model(name: str):
    cfg, ref = CONFIGS[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=ref).float().eval()
    return model, ref


def _logits(model, impl, **inputs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_own_attention(name):
    model, ref = _model(name)
    ids = torch.randint(0, 97, (2, 40))
    want, got = _logits(model, ref, input_ids=ids), _logits(model, "flexcomp", input_ids=ids)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_padded_batches_match(name, side):
    model, ref = _model(name)
    ids = torch.randint(0, 97, (3, 30))
    mask = torch.ones(3, 30, dtype=torch.long)
    for row, pad in ((1, 7), (2, 19)):
        if side == "left":
            mask[row, :pad] = 0
        else:
            mask[row, 30 - pad:] = 0
    want = _logits(model, ref, input_ids=ids, attention_mask=mask)
    got = _logits(model, "flexcomp", input_ids=ids, attention_mask=mask)
    keep = mask.bool()  # padded positions' outputs are not defined the same way: compare real tokens
    torch.testing.assert_close(got[keep], want[keep], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2"])
def test_packed_sequences_from_position_ids_match(name):
    model, ref = _model(name)
    ids = torch.randint(0, 97, (1, 36))
    position_ids = torch.cat([torch.arange(10), torch.arange(17), torch.arange(9)]).view(1, -1)
    want = _logits(model, ref, input_ids=ids, position_ids=position_ids)
    got = _logits(model, "flexcomp", input_ids=ids, position_ids=position_ids)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    # and the packing is real: it differs from one unpacked sequence
    assert not torch.allclose(got, _logits(model, "flexcomp", input_ids=ids), atol=1e-3)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generation_with_a_kv_cache_gives_the_same_tokens(name, cache):
    """A static cache's query offset is a tensor that the cache's update advances in place during
    the forward: the mask must keep the step's value (it read the advanced one, and attended one
    unwritten key, until the mask function copied it)."""
    model, ref = _model(name)
    ids = torch.randint(0, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as generate expects
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    out = {}
    for impl in (ref, "flexcomp"):
        model.set_attn_implementation(impl)
        out[impl] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                                   min_new_tokens=20, pad_token_id=0, **extra)
    assert torch.equal(out["flexcomp"], out[ref])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_step_loss_and_every_gradient_match(name):
    model, ref = _model(name)
    model.train()
    ids = torch.randint(0, 97, (2, 24))
    results = {}
    for impl in (ref, "flexcomp"):
        model.set_attn_implementation(impl)
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results[impl] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (loss_ref, g_ref), (loss_fc, g_fc) = results[ref], results["flexcomp"]
    torch.testing.assert_close(loss_fc, loss_ref, atol=1e-5, rtol=1e-5)
    assert g_fc.keys() == g_ref.keys() and len(g_ref) > 10
    for n in g_ref:
        torch.testing.assert_close(g_fc[n], g_ref[n], atol=2e-5, rtol=1e-3, msg=lambda m, n=n: f"{n}: {m}")


def test_one_block_mask_per_forward_shared_by_the_layers(monkeypatch):
    model, _ = _model("llama")
    assert model.config.num_hidden_layers == 2
    made, seen = [], []
    real_mask, real_attention = fct.flexcomp_mask, fct.flexcomp_attention

    def mask(*args, **kwargs):
        made.append(real_mask(*args, **kwargs))
        return made[-1]

    def attention(module, q, k, v, attention_mask, **kwargs):
        seen.append(attention_mask)
        return real_attention(module, q, k, v, attention_mask, **kwargs)

    monkeypatch.setattr(transformers.masking_utils.AttentionMaskInterface, "_global_mapping",
                        {**transformers.masking_utils.AttentionMaskInterface._global_mapping, "flexcomp": mask})
    monkeypatch.setattr(transformers.AttentionInterface, "_global_mapping",
                        {**transformers.AttentionInterface._global_mapping, "flexcomp": attention})
    _logits(model, "flexcomp", input_ids=torch.randint(0, 97, (2, 20)))
    assert len(made) == 1 and isinstance(made[0], BlockMask)
    assert len(seen) == 2 and all(m is made[0] for m in seen)


def test_from_config_and_set_attn_implementation_accept_the_name():
    cfg, _ = CONFIGS["llama"]
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="flexcomp")
    assert model.config._attn_implementation == "flexcomp"
    model.set_attn_implementation("sdpa")
    model.set_attn_implementation("flexcomp")
    assert model.config._attn_implementation == "flexcomp"


def test_attention_dropout_runs_in_training_and_not_in_eval():
    cfg, _ = CONFIGS["llama"]
    cfg = transformers.LlamaConfig(**{**cfg.to_dict(), "attention_dropout": 0.3})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()
    ids = torch.randint(0, 97, (1, 12))
    want = _logits(model.eval(), "sdpa", input_ids=ids)
    torch.testing.assert_close(_logits(model.eval(), "flexcomp", input_ids=ids), want, atol=2e-4, rtol=1e-4)
    model.train()
    torch.manual_seed(1)
    a = model(input_ids=ids).logits
    torch.manual_seed(1)
    b = model(input_ids=ids).logits
    assert torch.equal(a, b) and not torch.allclose(a, want, atol=1e-3)  # dropped, reproducibly
    a.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_the_docs_example_runs(capsys):
    import pathlib
    import re

    page = pathlib.Path(__file__).resolve().parent.parent / "docs" / "transformers.md"
    if not page.exists():
        pytest.skip("docs/ is not next to tests/ (an installed test run)")
    code = re.search(r"```python\n(.*?)```", page.read_text(), re.S).group(1)
    exec(compile(code, str(page), "exec"), {})
    assert "torch.Size([2, 24])" in capsys.readouterr().out


def test_attention_function_sinks_dense_masks_and_position_bias_against_dense_softmax():
    B, H, Hkv, L, S, D = 2, 4, 2, 5, 7, 8
    q = torch.randn(B, H, L, D, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, S, D, dtype=torch.float64) for _ in range(2))
    sinks = torch.randn(H, dtype=torch.float64)
    mask = torch.randn(B, 1, L, S + 3, dtype=torch.float64)  # wider than S, as models' masks can be
    bias = torch.randn(B, H, L, S, dtype=torch.float64)
    module = torch.nn.Module().eval()
    out, weights = fct.flexcomp_attention(module, q, k, v, mask, scaling=0.3, softcap=4.0, s_aux=sinks,
                                          position_bias=bias)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = q @ kk.transpose(-1, -2) * 0.3
    s = 4.0 * torch.tanh(s / 4.0) + mask[..., :S] + bias
    full = torch.cat([s, sinks.view(1, H, 1, 1).expand(B, H, L, 1)], dim=-1)  # the sink: one more logit
    want = (torch.softmax(full, -1)[..., :S] @ vv).transpose(1, 2)
    assert weights is None and out.shape == (B, L, H, D)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_unpadded_generation_takes_decode_steps_rows_from_one_mask(name, monkeypatch):
    """Without padding, each decoding step's BlockMask is a row of the cache's mask (built once per
    4096 tokens), not a new create_block_mask; the tokens are SDPA's."""
    rows = []
    real = fct._decode_row
    monkeypatch.setattr(fct, "_decode_row", lambda *a: rows.append(real(*a)) or rows[-1])
    model, ref = _model(name)
    ids = torch.randint(0, 97, (2, 9))
    out = {}
    for impl in (ref, "flexcomp"):
        model.set_attn_implementation(impl)
        out[impl] = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20,
                                   do_sample=False, min_new_tokens=20, pad_token_id=0)
    assert torch.equal(out["flexcomp"], out[ref])
    assert any(r is not None for r in rows)  # the row path served steps


def test_decode_row_masks_equal_a_fresh_mask():
    """A step's row mask gives the attention of a mask built for that step (int and tensor offsets),
    and declines mask functions that capture tensors."""
    from flexcomp import create_block_mask, flex_attention

    causal = transformers.masking_utils.causal_mask_function
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 4, 300, 16), torch.randn(2, 4, 300, 16)
    for off in (299, torch.tensor(150), 0):
        kv_len = 300 if not isinstance(off, int) or off == 299 else 1
        step = fct._decode_row(causal, 2, kv_len, off, "cpu")
        assert step is not None and step.seq_lengths == (1, kv_len)
        fresh = create_block_mask(transformers.masking_utils.add_offsets_to_mask_function(causal, off, 0), 2, None, 1,
                                  kv_len, device="cpu")
        kk, vv = k[:, :, :kv_len], v[:, :, :kv_len]
        torch.testing.assert_close(flex_attention(q, kk, vv, block_mask=step), flex_attention(q, kk, vv, block_mask=fresh))
    pad = transformers.masking_utils.padding_mask_function(torch.ones(2, 300, dtype=torch.bool))
    assert fct._decode_row(transformers.masking_utils.and_masks(causal, pad), 2, 300, 299, "cpu") is None
