"""Text generation: sample the next token (greedy, temperature, top-k, top-p), and the loop that feeds a prompt to
the model once and then one token per step through a KV cache (or, for checking, the whole sequence every step
without one). Used by scripts/generate.py, in one process or on every rank of a tensor-parallel model (whose
logits are replicated, so every rank runs this same loop in lockstep).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from trainer.models.kv_cache import KVCache


def sample_next(logits: Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Next token ids [batch] from logits [batch, vocab]: the argmax when temperature is 0, else a draw from
    softmax(logits / temperature) cut to the top_k most likely tokens and then to the smallest set whose
    probability reaches top_p (the most likely token always stays)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the ones more likely than it already reach top_p.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def cast_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast `model`'s parameters to the generation dtype once, in place; tied parameters stay one, and buffers (the
    RoPE table) stay fp32. The model then computes in `dtype` without autocast, which would cast every weight again
    at every token. Works on tensor-parallel (DTensor) parameters too. Returns the model."""
    cast: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dtype == dtype:
                continue
            if id(param) not in cast:
                cast[id(param)] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
            setattr(module, name, cast[id(param)])
    return model


@dataclass
class Generation:
    """What `generate` produced for one prompt."""

    tokens: list[int]
    """The new tokens, without the prompt; ends with a stop token if one was drawn."""
    logits: list[Tensor] = field(default_factory=list)
    """With keep_logits: the logits [vocab] (fp32, CPU) each new token was chosen from."""


@torch.no_grad()
def generate(model: nn.Module, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, use_cache: bool = True,
             stop_ids: tuple[int, ...] = (), keep_logits: bool = False,
             sync_token: Callable[[Tensor], None] | None = None) -> Generation:
    """Continue `prompt` (token ids) with up to `max_new_tokens` tokens from `model` (a Transformer in eval mode whose
    RoPE table covers len(prompt) + max_new_tokens positions); stop after a token in `stop_ids`. The model computes
    in the dtype of its weights (see `cast_weights`).

    With `use_cache` the prompt runs once and then each new token alone; without, the whole sequence runs every step
    (the reference the cache is tested against). Sampling draws from a generator seeded with `seed`, never from the
    global one. `sync_token`, under tensor parallel, overwrites each chosen token [1] in place with one rank's (a
    broadcast), so that all ranks feed the same token and stop at the same step even if their draws differed.
    """
    if not prompt:
        raise ValueError("generate needs a prompt of at least one token (e.g. just BOS)")
    device = next(model.parameters()).device
    max_len = len(prompt) + max_new_tokens
    if max_len > model.rope_cache.shape[0]:
        raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) = {max_len} exceeds the "
                         f"model's max_seq_len {model.rope_cache.shape[0]}")
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    cache = KVCache(max_len) if use_cache else None
    sequence = torch.tensor([prompt], dtype=torch.long, device=device)
    pending = sequence  # the tokens the model has not seen yet
    out = Generation(tokens=[])
    for _ in range(max_new_tokens):
        logits = model(pending, cache=cache) if use_cache else model(sequence)
        last = logits[:, -1].float()
        token = sample_next(last, temperature, top_k, top_p, generator)
        if sync_token is not None:
            sync_token(token)
        out.tokens.append(int(token.item()))
        if keep_logits:
            out.logits.append(last[0].cpu())
        sequence = torch.cat([sequence, token[:, None]], dim=1)
        pending = token[:, None]
        if out.tokens[-1] in stop_ids:
            break
    return out
