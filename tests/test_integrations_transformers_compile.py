"""attn_implementation="flexcomp" under ``torch.compile(model, fullgraph=True)``: small random-init
models in float32 on the CPU against transformers' own attention (SDPA, eager for Gemma-2) run
without compile: logits (plain, left- and right-padded, packed from ``position_ids``), a training step's loss
and every parameter's gradient, and 20 greedy tokens with a static and a dynamic KV cache.

No graph break is allowed (``fullgraph=True``): the mask is built by ``flexcomp::create_block_mask``
and attention runs as ``flexcomp::flex_attention`` inside the graph (flexcomp.custom_ops).
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")
fct = pytest.importorskip("flexcomp.integrations.transformers")

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
CONFIGS = {
    "llama": (lambda: transformers.LlamaConfig(**SMALL), "sdpa"),
    "mistral": (lambda: transformers.MistralConfig(**SMALL, sliding_window=12), "sdpa"),
    "gemma2": (lambda: transformers.Gemma2Config(**SMALL, head_dim=16, sliding_window=12, attn_logit_softcapping=20.0,
                                                 final_logit_softcapping=None, query_pre_attn_scalar=24), "eager"),
    "qwen2": (lambda: transformers.Qwen2Config(**SMALL), "sdpa"),
    "phi": (lambda: transformers.PhiConfig(**{**SMALL, "num_key_value_heads": 4}), "sdpa"),
}
TOL = dict(atol=2e-4, rtol=1e-4)


def _model(name: str):
    make, ref = CONFIGS[name]
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(make(), attn_implementation=ref).float(), ref


def _inputs(kind: str) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 40), generator=g)
    if kind in ("left-padded", "right-padded"):
        mask = torch.ones(2, 40, dtype=torch.long)
        mask[1, :9] = 0
        if kind == "right-padded":
            mask[1] = mask[1].flip(0)
        return dict(input_ids=ids, attention_mask=mask)
    if kind == "packed":
        packed = torch.cat([torch.arange(11), torch.arange(17), torch.arange(12)])
        return dict(input_ids=ids[:1], position_ids=packed[None])
    return dict(input_ids=ids)


def _step(model, inputs):
    labels = inputs["input_ids"].clone()
    if "attention_mask" in inputs:  # padded rows are defined differently: no loss on them, nor on the
        pad = inputs["attention_mask"] == 0  # token a padded row predicts (labels shift by one)
        labels[pad | torch.nn.functional.pad(pad, (1, 0))[:, :-1]] = -100
    out = model(**inputs, labels=labels)
    return out.logits, out.loss, torch.autograd.grad(out.loss, [p for p in model.parameters() if p.requires_grad])


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", ["plain", "left-padded", "right-padded", "packed"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fullgraph_logits_loss_and_gradients_match_transformers(name, kind):
    model, ref = _model(name)
    inputs = _inputs(kind)
    model.train()  # (no dropout in these configs) a training step
    model.set_attn_implementation(ref)
    want_logits, want_loss, want_grads = _step(model, inputs)
    model.set_attn_implementation("flexcomp")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    logits, loss, grads = _step(compiled, inputs)
    keep = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
    torch.testing.assert_close(logits[keep], want_logits[keep], **TOL)
    torch.testing.assert_close(loss, want_loss, **TOL)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=5e-4, rtol=1e-3)


def test_fullgraph_under_inductor():
    model, ref = _model("llama")
    inputs = _inputs("left-padded")
    model.set_attn_implementation(ref)
    want_logits, want_loss, want_grads = _step(model, inputs)
    model.set_attn_implementation("flexcomp")
    logits, loss, grads = _step(torch.compile(model, fullgraph=True), inputs)
    keep = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[keep], want_logits[keep], **TOL)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=5e-4, rtol=1e-3)


@pytest.mark.parametrize("cache", ["static", "dynamic"])
@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_compiled_forward_generates_transformers_tokens(name, cache):
    model, ref = _model(name)
    model.eval()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20, do_sample=False,
              pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        want = model.generate(**kw)
        model.set_attn_implementation("flexcomp")
        model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
        got = model.generate(**kw)
    assert torch.equal(got, want)


def test_attention_dropout_runs_its_layers_eagerly_under_compile():
    """Dropout has no custom op: in training mode those calls run eagerly (graph breaks), with the
    same keep pattern as without compile for the same torch seed."""
    make, _ = CONFIGS["llama"]
    cfg = make()
    cfg.attention_dropout = 0.2
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="flexcomp").float().train()
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(5)
    want = model(input_ids=ids, labels=ids).loss
    torch.manual_seed(5)
    got = torch.compile(model, backend="aot_eager")(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(got, want, **TOL)
    model.eval()
    assert not torch.allclose(model(input_ids=ids, labels=ids).loss, want)  # dropout did act in training
