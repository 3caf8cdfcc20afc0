"""Tensor parallel with sequence parallel (Megatron-style) over the `tp` mesh, applied from outside the model.

Inside a block, wq/wk/wv and w1/w3 are column-wise (each rank computes n_heads/tp heads and hidden/tp FFN
channels) and wo/w2 row-wise (their partial sums are reduce-scattered over the sequence). Between the
parallel regions the residual stream is sequence-sharded: each rank holds [batch, seq/tp, dim] and runs the
RMSNorms on its slice (SequenceParallel), so every activation outside attention and the MLP is 1/tp per rank.
PrepareModuleInput all-gathers the sequence on the way into attention and the MLP.

The embedding is vocab-parallel (its [vocab, dim] weight Shard(0): each rank looks up the tokens it owns and the
partial rows are reduce-scattered into the sequence-sharded stream) and the output projection column-wise (the
same Shard(0) of its [vocab, dim] weight). Both shard the same dim of the same-shaped matrix, which is what
makes tied embeddings (SmolLM) work: one DTensor parameter serves as both.

Loss parallel: the output keeps the logits as a DTensor sharded on the vocab dim, and cross-entropy under
`torch.distributed.tensor.parallel.loss_parallel` reduces the softmax statistics over tp instead of gathering
[batch, seq, vocab] logits on every rank. With parallelism.disable_loss_parallel the logits are all-gathered
and the loss is the ordinary one.

Every parameter ends up a DTensor on the tp mesh (norms Replicate, the rest Shard), which foreach AdamW and
gradient clipping need: they refuse a mix of DTensors and plain tensors.

Float8 (tensorwise scaling, trainer/converters.py): a block whose linears are all torchao Float8Linear gets
torchao's float8 styles instead, which cast each column-wise input to float8 before it is all-gathered (once for
q/k/v and once for w1/w3) and each row-wise output gradient before its all-gather in backward: the sequence
all-gathers move float8 bytes. The embedding and the output projection keep the plain styles. That is for NCCL:
gloo cannot move float8 tensors ("Invalid scalar type"), so on CPU Float8Linear runs under the plain styles (as it
does in torchtitan for the rowwise recipes), with the all-gathers in the parameter dtype.

Inference (scripts/generate.py) uses the same plan without sequence parallel (sequence_parallel=False): a decode
step feeds one token, which cannot be split over the sequence. The residual stream is then a plain tensor,
replicated on every rank: the embedding and wo/w2 all-reduce their partial sums into it, the norms are left plain
tensors, and the output all-gathers the full logits on every rank, so each rank can sample the next token itself.
"""

import contextlib

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from trainer.torch_private import enable_async_tensor_parallel


def _styles(float8: bool) -> tuple[type, type, type]:
    """(column-wise, row-wise, prepare-input) styles: torch's, or torchao's float8 ones."""
    if not float8:
        return ColwiseParallel, RowwiseParallel, PrepareModuleInput
    from torchao.float8.float8_tensor_parallel import (
        Float8ColwiseParallel,
        Float8RowwiseParallel,
        PrepareFloat8ModuleInput,
    )

    return Float8ColwiseParallel, Float8RowwiseParallel, PrepareFloat8ModuleInput


def block_plan(sequence_parallel: bool = True, float8: bool = False) -> dict:
    """The plan of one TransformerBlock: Megatron column/row pairs, with sequence-parallel norms between them
    (or, without sequence parallel, row-wise outputs all-reduced into the replicated stream); `float8`: the
    block's linears are Float8Linear (tensorwise), which take torchao's float8 styles."""
    colwise, rowwise, prepare_input = _styles(float8)
    stream = Shard(1) if sequence_parallel else Replicate()  # layout of the residual stream between the regions
    plan = {
        "attention.wq": colwise(),
        "attention.wk": colwise(),
        "attention.wv": colwise(),
        "attention.wo": rowwise(output_layouts=stream),
        "feed_forward.w1": colwise(),
        "feed_forward.w2": rowwise(output_layouts=stream),
        "feed_forward.w3": colwise(),
    }
    if sequence_parallel:
        plan |= {
            "attention_norm": SequenceParallel(),
            # Attention takes (x, rope_cache): gather x's sequence, leave the (plain, full) RoPE table alone.
            "attention": prepare_input(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": prepare_input(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        }
    return plan


def _all_float8(block: nn.Module) -> bool:
    """Every linear of the block is a torchao Float8Linear (none was filtered out by filter_fqns)."""
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    return bool(linears) and all(type(m).__name__ == "Float8Linear" for m in linears)


def outer_plan(loss_parallel_enabled: bool, sequence_parallel: bool = True) -> dict:
    """The plan of the embedding, final norm and output projection (the modules outside the blocks)."""
    stream = Shard(1) if sequence_parallel else Replicate()
    plan = {
        # Tokens are replicated over tp; the output leaves in the residual stream's layout.
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=stream),
        # Loss parallel keeps the logits a vocab-sharded DTensor for the loss; otherwise gather them.
        "output": ColwiseParallel(input_layouts=stream,
                                  output_layouts=Shard(-1) if loss_parallel_enabled else Replicate(),
                                  use_local_output=not loss_parallel_enabled),
    }
    if sequence_parallel:
        plan["norm"] = SequenceParallel()
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, loss_parallel_enabled: bool,
                          async_tp: bool = False, sequence_parallel: bool = True, float8: bool = False) -> None:
    """Shard `model` (on the meta device, before FSDP) over `tp_mesh` in place.

    float8: the model's linears were converted to float8 with tensorwise scaling; blocks whose linears all were
    get the float8 styles (see the module docstring).
    async_tp turns on inductor's micro-pipelined TP (CUDA + torch.compile only; the Trainer refuses it elsewhere).
    sequence_parallel=False is the inference plan (see the module docstring): its norms stay plain tensors, which
    an optimizer would refuse next to DTensors, so it is for generation, not training.
    """
    tied = model.tok_embeddings is not None and model.output is not None and \
        model.output.weight is model.tok_embeddings.weight
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan(sequence_parallel, float8 and _all_float8(block)))
    # A pipeline stage may lack the embedding, the final norm or the output: plan only the modules it has.
    plan = {name: style for name, style in outer_plan(loss_parallel_enabled, sequence_parallel).items()
            if getattr(model, name, None) is not None}
    parallelize_module(model, tp_mesh, plan)
    if tied:
        # parallelize_module registered a separate DTensor for each module; both are Shard(0) of the same
        # [vocab, dim] matrix on the same mesh, so one of them can serve both again.
        emb, out = model.tok_embeddings.weight, model.output.weight
        assert emb.placements == out.placements == (Shard(0),), (emb.placements, out.placements)
        model.output.weight = emb
    if async_tp:
        enable_async_tensor_parallel(tp_mesh.get_group().group_name)


def loss_context(enabled: bool) -> contextlib.AbstractContextManager:
    """Enter around the loss *and* its backward: loss_parallel() when the logits are vocab-sharded DTensors."""
    return loss_parallel() if enabled else contextlib.nullcontext()
