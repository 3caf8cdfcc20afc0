"""Llama model: parameter counts against published sizes, shapes, causality, init determinism, FLOPs by hand."""

import dataclasses
import math

import pytest
import torch

from trainer.models.flavors import FLAVORS, get_model_args
from trainer.models.llama import ModelArgs, RopeScaling, Transformer, flops_per_token, num_params

TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=128, max_seq_len=64)


def _model(args: ModelArgs, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights(seed)
    return model.eval()


@pytest.mark.parametrize(
    "name, flavor, expected, tol",
    [
        ("llama3", "8B", 8.03e9, 0.01e9),
        ("llama3", "1B", 1.24e9, 0.01e9),
        ("llama3", "70B", 70.55e9, 0.01e9),
        ("llama2", "7B", 6.74e9, 0.01e9),
        ("smollm", "135M", 134.5e6, 0.1e6),
        ("smollm", "1.7B", 1.71e9, 0.01e9),
    ],
)
def test_published_param_counts(name, flavor, expected, tol):
    assert abs(num_params(get_model_args(name, flavor)) - expected) <= tol


# The shapes in the HF config.json of meta-llama/Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B: hidden_size,
# num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size, vocab_size, tie_word_embeddings,
# rope_theta, rope_scaling.factor. 8B-4L is 8B's first 4 layers.
HF_LLAMA_SHAPES = {"1B": (2048, 16, 32, 8, 8192, 128256, True, 500000.0, 32.0),
                   "3B": (3072, 28, 24, 8, 8192, 128256, True, 500000.0, 32.0),
                   "8B": (4096, 32, 32, 8, 14336, 128256, False, 500000.0, 8.0),
                   "8B-4L": (4096, 4, 32, 8, 14336, 128256, False, 500000.0, 8.0)}


@pytest.mark.parametrize("flavor", HF_LLAMA_SHAPES)
def test_llama3_flavors_have_the_hf_shapes(flavor):
    a = get_model_args("llama3", flavor)
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.ffn_hidden_dim, a.vocab_size, a.tie_word_embeddings,
            a.rope_theta, a.rope_scaling.factor) == HF_LLAMA_SHAPES[flavor]


def test_llama3_8b_exact_count():
    assert num_params(get_model_args("llama3", "8B")) == 8_030_261_248


@pytest.mark.parametrize("name, flavor", [(n, f) for n in FLAVORS for f in FLAVORS[n]])
def test_num_params_matches_meta_model(name, flavor):
    args = get_model_args(name, flavor)
    with torch.device("meta"):
        model = Transformer(args)
    assert sum(p.numel() for p in model.parameters()) == num_params(args)
    assert model.rope_cache.shape == (args.max_seq_len, 2 * args.head_dim)
    if args.tie_word_embeddings:
        assert model.output.weight is model.tok_embeddings.weight


def test_get_model_args_errors_and_copies():
    with pytest.raises(ValueError, match="llama3"):
        get_model_args("gpt", "8B")
    with pytest.raises(ValueError, match="debugmodel"):
        get_model_args("llama3", "9B")
    args = get_model_args("llama3", "8B")
    args.max_seq_len = 8192
    assert FLAVORS["llama3"]["8B"].max_seq_len == 2048


def test_ffn_hidden_rule_and_override():
    assert get_model_args("llama3", "8B").ffn_hidden_dim == 14336
    assert get_model_args("llama2", "7B").ffn_hidden_dim == 11008
    assert get_model_args("smollm", "360M").ffn_hidden_dim == 2560


def test_flops_per_token_by_hand():
    # dim 64, 2 layers, 4 heads (head_dim 16), kv 4, ffn = 256 * ceil(170 / 256) = 256, vocab 128, untied.
    per_layer = 4 * 64 * 64 + 3 * 64 * 256 + 2 * 64
    non_embedding = 2 * per_layer + 64 + 128 * 64
    assert num_params(TINY, exclude_embedding=True) == non_embedding
    assert flops_per_token(TINY, 32) == 6 * non_embedding + 12 * 2 * 4 * 16 * 32


@pytest.mark.parametrize(
    "args",
    [
        get_model_args("llama3", "debugmodel"),
        dataclasses.replace(TINY, n_kv_heads=2),  # GQA
        dataclasses.replace(TINY, rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=32)),
        get_model_args("smollm", "debugmodel"),  # tied + GQA
    ],
    ids=["debugmodel", "gqa", "rope_scaling", "smollm_tied"],
)
def test_forward_shape_and_causality(args):
    model = _model(args)
    tokens = torch.randint(0, args.vocab_size, (2, 24))
    with torch.no_grad():
        logits = model(tokens)
        assert logits.shape == (2, 24, args.vocab_size)
        assert torch.isfinite(logits).all()
        t = 10
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % args.vocab_size
        logits2 = model(changed)
    torch.testing.assert_close(logits2[:, :t], logits[:, :t], rtol=0, atol=0)
    assert not torch.allclose(logits2[:, t:], logits[:, t:])


def test_gqa_equals_mha_with_repeated_kv_weights():
    """A GQA model equals an MHA model whose k/v heads are the GQA heads repeated n_rep times."""
    gqa_args = dataclasses.replace(TINY, n_kv_heads=2)
    gqa, mha = _model(gqa_args), _model(TINY)
    sd = gqa.state_dict()
    for key in list(sd):
        if key.endswith(("wk.weight", "wv.weight")):
            sd[key] = sd[key].view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
    mha.load_state_dict(sd)
    tokens = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(gqa(tokens), mha(tokens))


def test_init_param_depends_only_on_seed_and_name():
    args = dataclasses.replace(TINY, n_layers=5)
    full = _model(args, seed=3)
    partial = Transformer(args)
    for i in ("0", "1", "2"):
        del partial.layers[i]
    partial.tok_embeddings = None
    partial.init_weights(seed=3)
    for name, p in partial.layers["4"].named_parameters():
        assert torch.equal(p, full.layers["4"].get_parameter(name)), name
    assert torch.equal(partial.output.weight, full.output.weight)
    # Another seed gives another model.
    assert not torch.equal(_model(args, seed=4).layers["4"].attention.wq.weight, full.layers["4"].attention.wq.weight)


def test_init_scheme_scales():
    model = _model(dataclasses.replace(TINY, dim=256, n_heads=4, n_layers=4), seed=0)
    assert torch.equal(model.norm.weight, torch.ones(256))
    assert model.tok_embeddings.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert model.layers["0"].attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.layers["3"].feed_forward.w2.weight.std().item() == pytest.approx(0.02 / 8**0.5, rel=0.05)
    out = model.output.weight
    assert out.abs().max().item() <= 3 * 256**-0.5


def test_meta_init_then_materialise_matches_eager():
    args = dataclasses.replace(TINY, rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=32))
    with torch.device("meta"):
        meta = Transformer(args)
    meta.to_empty(device="cpu")
    meta.init_weights(seed=0)
    eager = _model(args, seed=0)
    torch.testing.assert_close(meta.rope_cache, eager.rope_cache, rtol=0, atol=0)
    tokens = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(meta.eval()(tokens), eager(tokens), rtol=0, atol=0)


def test_materializing_from_meta_keeps_tied_embeddings():
    # to_empty() from meta unties shared parameters; the trainer's materialization must re-tie them.
    from trainer.weights import init_weights

    with torch.device("meta"):
        model = Transformer(get_model_args("smollm", "debugmodel"))
    init_weights(model, seed=3, device=torch.device("cpu"))
    assert model.output.weight is model.tok_embeddings.weight
    assert [n for n, _ in model.named_parameters()].count("output.weight") == 0
    eager = Transformer(get_model_args("smollm", "debugmodel"))
    eager.init_weights(seed=3)
    for (name, a), (_, b) in zip(model.named_parameters(), eager.named_parameters()):
        assert torch.equal(a, b), name


def test_tied_model_starts_near_uniform_loss():
    # log(vocab) is the loss of a uniform guess; a badly scaled tied init starts far above it.
    model = Transformer(get_model_args("smollm", "debugmodel"))
    model.init_weights(seed=0)
    tokens = torch.randint(0, 2048, (2, 64), generator=torch.Generator().manual_seed(0))
    loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    assert abs(loss.item() - math.log(2048)) < 0.5, loss.item()
