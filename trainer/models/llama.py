"""Llama in plain PyTorch: model args, the Transformer, its initialisation, and parameter/FLOP counts (the
flavors table, by name and size, is models/flavors.py).

No parallelism lives here. Tensor, context, sequence and pipeline parallelism are applied from outside, so the
code below only keeps a few promises for them: head counts come from tensor shapes (a TP shard has fewer heads),
RoPE rows come from a buffer that is passed in (CP shards it along dim 0), layers sit in a ModuleDict with
string keys (a pipeline stage deletes some and keeps the names), and each parameter's initial value depends
only on (seed, name) (any layout initialises the same model). Generation passes a KV cache as an optional keyword
(never positionally: a tensor-parallel plan hooks the blocks' positional inputs); without one, nothing changes.
Document masking (attn_mask_type "block_causal", trainer/models/attention.py) comes in the same way: the caller
passes each token's document id as the keyword `document_ids`, and the mask built from them once per forward
reaches the blocks as the keyword `mask`, so tensor parallel leaves it whole on every rank.
"""

import math
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.models.attention import ATTN_MASK_TYPES, ATTN_TYPES, build_mask, masked_attention

if TYPE_CHECKING:
    from trainer.models.kv_cache import KVCache, LayerKVCache


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 RoPE frequency scaling (HF rope_type "llama3")."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelArgs:
    """Hyper-parameters of a Llama model; everything the model and the param/FLOP counts need."""

    dim: int = 256
    """Width of the residual stream."""
    n_layers: int = 6
    """Number of transformer blocks."""
    n_heads: int = 16
    """Number of query heads."""
    n_kv_heads: int | None = None
    """Number of key/value heads; None means n_heads, fewer means grouped-query attention."""
    vocab_size: int = 2048
    """Rows of the embedding and of the output projection."""
    multiple_of: int = 256
    """The SwiGLU hidden size is rounded up to a multiple of this."""
    ffn_dim_multiplier: float | None = None
    """Scales the SwiGLU hidden size before rounding (Meta's params.json)."""
    ffn_hidden: int | None = None
    """Explicit SwiGLU hidden size; overrides the Llama rule (SmolLM's sizes do not follow it)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: RopeScaling | None = None
    """Llama 3.1 frequency scaling, or None for plain RoPE."""
    max_seq_len: int = 2048
    """Rows of the RoPE table, the longest sequence the model takes; set it to the training sequence length,
    since context parallel shards this table together with the sequence."""
    tie_word_embeddings: bool = False
    """Share one matrix between the token embedding and the output projection."""
    attn_type: str = "sdpa"
    """Attention kernel (torchtitan's names): sdpa, flex (FlexAttention with a block mask) or varlen (torch's
    variable-length flash attention). On CPU every type runs SDPA with a boolean mask (see models/attention.py)."""
    attn_mask_type: str = "causal"
    """causal (every earlier token of the window) or block_causal (only earlier tokens of the same document)."""

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.attn_type not in ATTN_TYPES or self.attn_mask_type not in ATTN_MASK_TYPES:
            raise ValueError(f"model: attn_type={self.attn_type!r}, attn_mask_type={self.attn_mask_type!r}; "
                             f"choose attn_type from {ATTN_TYPES} and attn_mask_type from {ATTN_MASK_TYPES}")
        if self.attn_type == "varlen" and self.attn_mask_type != "block_causal":
            raise ValueError("model: attn_type='varlen' packs documents and needs attn_mask_type='block_causal'")
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model: dim={self.dim}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads} do not divide; "
                "dim must be a multiple of n_heads and n_heads a multiple of n_kv_heads"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        """Width of one token's keys (and of its values): n_kv_heads heads."""
        return self.n_kv_heads * self.head_dim

    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head."""
        return self.n_heads // self.n_kv_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU hidden size: `ffn_hidden` if set, else Meta's rule (2/3 of 4*dim, scaled, rounded up)."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


def num_params(args: ModelArgs, exclude_embedding: bool = False) -> int:
    """Parameter count computed from args alone (equals the sum of numel of a built model).

    exclude_embedding drops the embedding table, which is a lookup and costs no FLOPs. A tied table is also
    the output projection, a real matmul, so it is kept then: this count is what `flops_per_token` needs.
    """
    d, hd = args.dim, args.head_dim
    attention = 2 * d * args.n_heads * hd + 2 * d * args.n_kv_heads * hd
    layer = attention + 3 * d * args.ffn_hidden_dim + 2 * d
    embedding = args.vocab_size * d
    total = args.n_layers * layer + d + embedding + (0 if args.tie_word_embeddings else embedding)
    if exclude_embedding and not args.tie_word_embeddings:
        total -= embedding
    return total


def flops_per_token(args: ModelArgs, seq_len: int) -> int:
    """Training FLOPs per token: 6 per matmul weight (fwd + bwd) plus the attention score and value matmuls.

    The attention term counts the full seq_len x seq_len matrices, not halved for causality (as PaLM and
    torchtitan do), so MFU figures compare with theirs.
    """
    attention = 12 * args.n_layers * args.n_heads * args.head_dim * seq_len
    return 6 * num_params(args, exclude_embedding=True) + attention


def param_generator(seed: int, name: str, device: torch.device | str) -> torch.Generator:
    """A generator seeded from (seed, parameter name): a parameter's initial value is then the same in any
    parallel layout or pipeline split, however many other parameters this rank holds."""
    generator = torch.Generator(device=device)
    # One 32-bit hash of both: the CPU generator (mt19937) ignores the high 32 bits of a 64-bit seed.
    generator.manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
    return generator


def rope_inv_freq(args: ModelArgs) -> Tensor:
    """RoPE inverse frequencies in fp32, with Llama 3.1 scaling exactly as HF `_compute_llama3_parameters`."""
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    s = args.rope_scaling
    if s is None:
        return inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated smoothly.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate x [batch, seq, heads, head_dim] by rope [seq, 2*head_dim] (cos then sin), HF rotate_half layout.

    Computed in fp32 so bf16 activations do not lose the position signal; cast back to x's dtype.
    """
    cos, sin = rope.unsqueeze(1).chunk(2, dim=-1)
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).type_as(x)


class RMSNorm(nn.Module):
    """RMSNorm with HF LlamaRMSNorm numerics: normalise in fp32, cast back, then scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    """Causal (or, given a mask, block-causal) self-attention with RoPE and grouped-query attention."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: Tensor, rope_cache: Tensor, cache: "LayerKVCache | None" = None, mask=None) -> Tensor:
        """`mask`: a block-causal mask from attention.build_mask (document masking), or None for causal."""
        # Shapes and head counts come from the tensors: under TP each rank holds n_heads/tp heads,
        # under CP seqlen and rope_cache are this rank's shard.
        bsz, seqlen, _ = x.shape
        q = apply_rope(self.wq(x).view(bsz, seqlen, -1, self.head_dim), rope_cache[:seqlen])
        k = apply_rope(self.wk(x).view(bsz, seqlen, -1, self.head_dim), rope_cache[:seqlen])
        v = self.wv(x).view(bsz, seqlen, -1, self.head_dim)
        start = 0
        if cache is not None:
            start = cache.start
            k, v = cache.update(k, v)  # now every position so far: the queries are the last seqlen of them
        n_rep = q.shape[2] // k.shape[2]
        if n_rep > 1:
            # Explicit repeat rather than SDPA's enable_gqa, which not every backend/CP path supports.
            k, v = k.repeat_interleave(n_rep, dim=2), v.repeat_interleave(n_rep, dim=2)
        if mask is not None:
            out = masked_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        elif start == 0:
            # Training, and a prompt's prefill: queries and keys are the same positions, so plain causal attention,
            # which the flash and memory-efficient kernels run (an explicit mask would rule them out).
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True)
        else:
            # Query i is at position start + i and sees keys 0..start + i. SDPA's is_causal would align the
            # diagonal top-left instead; one query (a decode step) sees every key and needs no mask.
            mask = None if seqlen == 1 else torch.ones(seqlen, k.shape[1], dtype=torch.bool,
                                                        device=q.device).tril(start)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then + feed_forward(norm(.))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, rope_cache: Tensor, cache: "LayerKVCache | None" = None, mask=None) -> Tensor:
        if mask is not None:
            h = x + self.attention(self.attention_norm(x), rope_cache, mask=mask)
        elif cache is None:
            h = x + self.attention(self.attention_norm(x), rope_cache)
        else:
            h = x + self.attention(self.attention_norm(x), rope_cache, cache=cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Decoder-only Llama. tok_embeddings, norm and output may be set to None by a pipeline stage."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args) for i in range(args.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(args.dim, args.norm_eps)
        self.output: nn.Linear | None = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Non-persistent: derived from args, so checkpoints stay free of it and HF-compatible.
        self.register_buffer("rope_cache", torch.empty(args.max_seq_len, 2 * args.head_dim), persistent=False)
        self.init_buffers()

    def forward(self, tokens: Tensor, cache: "KVCache | None" = None, document_ids: Tensor | None = None) -> Tensor:
        """tokens [batch, seq] int64 -> logits [batch, seq, vocab]; a pipeline stage passes hidden states instead.

        With a `cache` the tokens continue the cached sequence at position cache.start, and are cached in turn.
        `document_ids` [batch, seq] (attention.document_ids; block_causal models): attention stays within each
        document; one mask is built here for every layer. Without them attention is causal over the window.
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if document_ids is not None:
            if cache is not None:
                raise ValueError("document_ids with a KV cache: generation runs one document, causal attention")
            mask = build_mask(document_ids, self.args.attn_type)
            for layer in self.layers.values():
                h = layer(h, self.rope_cache, mask=mask)
        elif cache is None:
            for layer in self.layers.values():
                h = layer(h, self.rope_cache)
        else:
            start, end = cache.start, cache.start + tokens.shape[1]
            if end > self.rope_cache.shape[0]:
                raise ValueError(f"positions up to {end - 1} need a RoPE table of {end} rows, but the model has "
                                 f"max_seq_len = {self.rope_cache.shape[0]}; build it with a larger max_seq_len")
            for name, layer in self.layers.items():
                h = layer(h, self.rope_cache[start:end], cache=cache.layer(name))
            cache.advance(tokens.shape[1])
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h

    def init_weights(self, seed: int = 0) -> None:
        """Initialise buffers and every parameter in place; for a model whose parameters are plain tensors."""
        self.init_buffers()
        for name, param in self.named_parameters():
            self.init_param_(name, param.data, param_generator(seed, name, param.device))

    @torch.no_grad()
    def init_buffers(self) -> None:
        """(Re)compute rope_cache on the buffer's device, e.g. after `to_empty` from the meta device."""
        device = self.rope_cache.device
        positions = torch.arange(self.args.max_seq_len, dtype=torch.float32, device=device)
        freqs = positions[:, None] * rope_inv_freq(self.args).to(device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.rope_cache.copy_(torch.cat((emb.cos(), emb.sin()), dim=-1))

    @torch.no_grad()
    def init_param_(self, name: str, tensor: Tensor, generator: torch.Generator) -> None:
        """Fill the full-size plain `tensor` in place with the initial value of the parameter called `name`.

        torchtitan's scheme: norms are ones; wq/wk/wv/w1 N(0, 0.02); wo/w2/w3 N(0, 0.02/sqrt(2*(layer+1))) so
        deeper residual branches start smaller; output N(0, dim**-0.5) so logits start at unit scale. The
        embedding is N(0, 1) when untied. A tied matrix is N(0, 0.02) (HF's initializer_range): the residual
        stream carries the input embedding to the final norm, so logit(current token) starts at
        sqrt(dim) * |e|, which dim**-0.5 would make ~sqrt(dim) and the initial loss ~12 instead of ~log(vocab).
        Normals are cut at 3 std.
        """
        parts = name.split(".")
        out_std = self.args.dim**-0.5
        if name.endswith("norm.weight"):
            nn.init.ones_(tensor)
        elif name == "tok_embeddings.weight" and not self.args.tie_word_embeddings:
            nn.init.normal_(tensor, std=1.0, generator=generator)
        elif name == "tok_embeddings.weight":  # tied
            nn.init.trunc_normal_(tensor, std=0.02, a=-0.06, b=0.06, generator=generator)
        elif name == "output.weight":
            nn.init.trunc_normal_(tensor, std=out_std, a=-3 * out_std, b=3 * out_std, generator=generator)
        elif parts[0] == "layers" and parts[-2] in ("wq", "wk", "wv", "w1"):
            nn.init.trunc_normal_(tensor, std=0.02, a=-0.06, b=0.06, generator=generator)
        elif parts[0] == "layers" and parts[-2] in ("wo", "w2", "w3"):
            std = 0.02 / (2 * (int(parts[1]) + 1)) ** 0.5
            nn.init.trunc_normal_(tensor, std=std, a=-3 * std, b=3 * std, generator=generator)
        else:
            raise ValueError(f"init_param_: no initialisation rule for parameter {name!r}")
