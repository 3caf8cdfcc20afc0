"""Document masking: which earlier tokens a token may attend to when several documents are packed into one window.

Pre-training packs documents back to back (BOS text EOS BOS text EOS ...). `attn_mask_type = "causal"` lets every
token see every earlier token of the window; `"block_causal"` only the earlier tokens of its own document. A
document ends at its EOS (torchtitan's rule, so BOS is optional): `document_ids` numbers the documents of each row.
The caller computes them once per batch from the tokens (a pipeline stage past the first has no tokens, so they
travel with the microbatch as a [batch, seq] tensor); `Transformer.forward` turns them into one mask for the kernel
of `attn_type`, shared by every layer:

  flex    CUDA: a FlexAttention BlockMask (create_block_mask, compiled), run by compiled flex_attention
  varlen  CUDA: cumulative document lengths for torch.nn.attention.varlen.varlen_attn (flash kernels)
  sdpa, and every type on CPU: a boolean [batch, 1, seq, seq] mask (same document and not in the future) for
          F.scaled_dot_product_attention, which runs the CPU flash kernel with it. torch 2.13 has no FlexAttention
          backward on CPU ("FlexAttention does not support backward on CPU") and no CPU varlen kernel
          (aten::_flash_attention_forward is CUDA-only). Per-document attention is faster at seq 2048 but needs
          the document lengths on the host and data-dependent shapes, which fullgraph compile refuses; see the
          README's *Document masking* for the figures.

RoPE positions stay global (the position in the window, not in the document), as torchtitan does by default:
the packed model then computes exactly what each document alone computes when shifted to its offset, and
relative-position RoPE makes attention scores depend only on offsets within a document anyway.
"""

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

ATTN_TYPES = ("sdpa", "flex", "varlen")
ATTN_MASK_TYPES = ("causal", "block_causal")


class VarlenMetadata(NamedTuple):
    """Documents of a flattened [batch * seq] window for varlen_attn: cumulative lengths (int32) and the longest."""

    cu_seqlens: Tensor
    max_len: int


def document_ids(tokens: Tensor, eos_id: int) -> Tensor:
    """[batch, seq] int32: for each token, how many EOS come before it in its row (the EOS closes its document)."""
    eos = (tokens == eos_id).to(torch.int32)
    return torch.cumsum(eos, dim=1, dtype=torch.int32) - eos


def boolean_block_causal_mask(doc_ids: Tensor) -> Tensor:
    """[batch, 1, seq, seq] bool: True where query i may attend to key j (same document, j <= i)."""
    seq = doc_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=doc_ids.device).tril()
    return (doc_ids[:, None, :, None] == doc_ids[:, None, None, :]) & causal


@functools.cache
def _compiled(fn):
    """One compiled copy per function for the whole process (compiling per call or per layer recompiles)."""
    return torch.compile(fn)


def block_causal_mask_mod(doc_ids: Tensor):
    """FlexAttention's mask_mod of the block-causal mask: query q_idx of row b sees key kv_idx of its document."""

    def same_document_causal(b, h, q_idx, kv_idx):
        return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (q_idx >= kv_idx)

    return same_document_causal


def flex_block_mask(doc_ids: Tensor):
    """A FlexAttention BlockMask of the block-causal mask of `doc_ids` (CUDA; create_block_mask compiled)."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, seq = doc_ids.shape
    return _compiled(create_block_mask)(block_causal_mask_mod(doc_ids), batch, None, seq, seq,
                                        device=doc_ids.device)


def varlen_metadata(doc_ids: Tensor) -> VarlenMetadata:
    """The documents of every row, one after another, as varlen_attn's cumulative lengths (one host sync)."""
    batch, seq = doc_ids.shape
    flat = (doc_ids.to(torch.int64) + torch.arange(batch, device=doc_ids.device)[:, None] * (seq + 1)).flatten()
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    end = torch.tensor([flat.numel()], device=flat.device)
    cu = torch.cat([starts.nonzero().flatten(), end]).to(torch.int32)
    return VarlenMetadata(cu, int(cu.diff().max().item()))


def build_mask(doc_ids: Tensor, attn_type: str):
    """The mask object the kernel of `attn_type` takes on doc_ids' device (see the module docstring)."""
    if doc_ids.device.type == "cuda" and attn_type == "flex":
        return flex_block_mask(doc_ids)
    if doc_ids.device.type == "cuda" and attn_type == "varlen":
        return varlen_metadata(doc_ids)
    return boolean_block_causal_mask(doc_ids)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask) -> Tensor:
    """Attention of q, k, v [batch, heads, seq, head_dim] (as many k/v heads as q heads) under a `build_mask` mask."""
    if isinstance(mask, Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if isinstance(mask, VarlenMetadata):
        from torch.nn.attention.varlen import varlen_attn

        batch, heads, seq, head_dim = q.shape
        packed = [t.transpose(1, 2).reshape(batch * seq, heads, head_dim) for t in (q, k, v)]
        out = varlen_attn(*packed, mask.cu_seqlens, mask.cu_seqlens, mask.max_len, mask.max_len,
                          window_size=(-1, 0))  # (-1, 0): causal within each document
        return out.view(batch, seq, heads, head_dim).transpose(1, 2)
    from torch.nn.attention.flex_attention import flex_attention

    return _compiled(flex_attention)(q, k, v, block_mask=mask)
