"""Document masking (block-causal attention): against each document run alone, and the CUDA masks' logic on CPU.

The reference: a packed window of several documents through the block-causal model must give, token for token,
the logits of each document alone through the causal model (global RoPE positions change nothing: RoPE scores
depend only on offsets within a document), and the same parameter gradients as the documents' losses summed.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from trainer.build import plan_run
from trainer.config import ConfigError, load_config
from trainer.models.attention import (block_causal_mask_mod, boolean_block_causal_mask, document_ids,
                                      masked_attention, varlen_metadata)
from trainer.models.flavors import FLAVORS, get_model_args
from trainer.models.llama import ModelArgs, Transformer

EOS = 1
# Three documents ending in EOS, then the start of a fourth that the window cuts off.
DOC_LENGTHS = (5, 17, 9, 33)
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=64,
                 attn_type="flex", attn_mask_type="block_causal")


def _packed(lengths=DOC_LENGTHS, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(2, ARGS.vocab_size, (n,), generator=g) for n in lengths]
    for doc in docs[:-1]:
        doc[-1] = EOS
    return torch.cat(docs)[None], docs


def _model(args: ModelArgs) -> Transformer:
    model = Transformer(args)
    model.init_weights(seed=3)
    return model


def test_document_ids_end_each_document_at_its_eos():
    tokens = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8, 9]])
    assert document_ids(tokens, EOS).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]


def test_block_causal_logits_and_gradients_equal_each_document_alone():
    tokens, docs = _packed()
    packed = _model(ARGS)
    alone = _model(dataclasses.replace(ARGS, attn_type="sdpa", attn_mask_type="causal"))
    weights = torch.randn(tokens.shape[1], ARGS.vocab_size, generator=torch.Generator().manual_seed(1))

    logits = packed(tokens, document_ids=document_ids(tokens, EOS))[0]
    (logits * weights).sum().backward()
    pieces, start = [], 0
    for doc in docs:
        out = alone(doc[None])[0]
        (out * weights[start:start + len(doc)]).sum().backward()
        pieces.append(out.detach())
        start += len(doc)
    assert (logits.detach() - torch.cat(pieces)).abs().max().item() <= 1e-5
    for (name, p), q in zip(packed.named_parameters(), alone.parameters()):
        scale = q.grad.abs().max().item()
        assert (p.grad - q.grad).abs().max().item() <= 1e-5 * max(1.0, scale), name
    # and the mask is really applied: the causal model over the whole window differs after the first document
    causal = alone(tokens)[0].detach()
    assert (causal[DOC_LENGTHS[0]:] - logits[DOC_LENGTHS[0]:].detach()).abs().max().item() > 1e-2


def _qkv(doc_ids: torch.Tensor, heads: int = 2, head_dim: int = 8):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(doc_ids.shape[0], heads, doc_ids.shape[1], head_dim, generator=g) for _ in range(3)]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_mask_mod_equals_the_boolean_mask():
    """The BlockMask CUDA runs, built and applied eagerly on CPU (FlexAttention forward runs there, no backward)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    tokens = torch.cat([_packed(seed=0)[0], _packed((20, 3, 41), seed=1)[0]])
    ids = document_ids(tokens, EOS)
    q, k, v = _qkv(ids)
    block_mask = create_block_mask(block_causal_mask_mod(ids), ids.shape[0], None, ids.shape[1], ids.shape[1],
                                   device="cpu")
    with torch.no_grad():
        expected = masked_attention(q, k, v, boolean_block_causal_mask(ids))
        assert (flex_attention(q, k, v, block_mask=block_mask) - expected).abs().max().item() <= 1e-5


def test_varlen_metadata_cuts_rows_into_their_documents():
    tokens = torch.cat([_packed(seed=0)[0], _packed((20, 3, 41), seed=1)[0]])
    ids = document_ids(tokens, EOS)
    meta = varlen_metadata(ids)
    assert meta.cu_seqlens.tolist() == [0, 5, 22, 31, 64, 84, 87, 128] and meta.max_len == 41
    # varlen_attn's meaning (causal attention within each span of the flattened rows), computed with SDPA
    q, k, v = _qkv(ids)
    flat = [t.transpose(1, 2).flatten(0, 1) for t in (q, k, v)]  # [batch * seq, heads, head_dim]
    spans = meta.cu_seqlens.diff().tolist()
    outs = [F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in parts), is_causal=True)[0]
            for parts in zip(*(t.split(spans) for t in flat))]
    got = torch.cat([o.transpose(0, 1) for o in outs]).view(2, 64, 2, 8).transpose(1, 2)
    assert (got - masked_attention(q, k, v, boolean_block_causal_mask(ids))).abs().max().item() <= 1e-6


def test_torchtitan_flavors_and_their_siblings():
    for base in ("debugmodel", "8B"):
        causal = get_model_args("llama3", base)
        for flavor, attn in ((f"{base}_flex" if base == "8B" else f"{base}_flex_attn", "flex"),
                             (f"{base}_varlen" if base == "8B" else f"{base}_varlen_attn", "varlen")):
            args = FLAVORS["llama3"][flavor]
            assert (args.attn_type, args.attn_mask_type) == (attn, "block_causal")
            assert dataclasses.replace(args, attn_type="sdpa", attn_mask_type="causal") == causal


@pytest.mark.parametrize("overrides, match", [
    (["--parallelism.context_parallel_degree", "2"], "context_parallel_degree = 2"),
    (["--training.dataset", "synthetic"], "training.dataset = 'synthetic'"),
])
def test_block_causal_refusals_are_one_line(overrides, match):
    cfg = load_config(["--model.flavor", "debugmodel_flex_attn", "--training.seq_len", "64", *overrides])
    with pytest.raises(ConfigError, match=match) as e:
        plan_run(cfg, 2, "cpu")
    assert "\n" not in str(e.value) and "model.flavor = 'debugmodel_flex_attn'" in str(e.value)


def test_varlen_needs_block_causal():
    with pytest.raises(ValueError, match="block_causal"):
        ModelArgs(attn_type="varlen")
