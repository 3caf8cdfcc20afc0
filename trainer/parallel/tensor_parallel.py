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

A sequence-parallel norm's weight gradient comes out of backward Partial over tp (each rank summed over its part
of the sequence). Left so, DTensor all-reduces it again inside every op that reads it: the norm of the gradients,
then AdamW's foreach lerp and addcmul (three more), one small all-reduce per norm weight each time: 36 a step for
4 layers, the largest cost of the TP step on CPU measured by torch.profiler (see the README). `reduce_partial_grads`
sums them all in one all-reduce after backward and leaves them Replicate. (FSDP2 redistributes them itself.)

Float8 (tensorwise scaling, trainer/converters.py): a block whose linears are all torchao Float8Linear gets
torchao's float8 styles instead, which cast each column-wise input to float8 before it is all-gathered (once for
q/k/v and once for w1/w3) and each row-wise output gradient before its all-gather in backward: the sequence
all-gathers move float8 bytes. The embedding and the output projection keep the plain styles. That is for NCCL:
gloo cannot move float8 tensors ("Invalid scalar type"), so on CPU Float8Linear runs under the plain styles (as it
does in torchtitan for the rowwise recipes), with the all-gathers in the parameter dtype.

Without sequence parallel (parallelism.enable_sequence_parallel = false, picotron's and Megatron's plain TP) the
residual stream is a plain tensor, replicated on every rank: the embedding and wo/w2 all-reduce their partial
sums into it (forward), and attention and the MLP each take it as one Replicate DTensor, so the column-wise
input gradients of wq/wk/wv (or w1/w3) add up as Partial DTensors and are all-reduced once per region (backward).
That is one all-reduce where sequence parallel runs an all-gather and a reduce-scatter: the same bytes in half
the collectives, for norms computed on the whole sequence by every rank and full-size activations between the
regions. The norms keep their weights as Replicate DTensors (ReplicatedNorm) and run on the replicated stream.
Inference (scripts/generate.py) uses this plan too: a decode step feeds one token, which cannot be split over
the sequence, and the output all-gathers the full logits on every rank, so each rank can sample the next token.
"""

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
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


class ReplicatedNorm(ParallelStyle):
    """A norm on the replicated residual stream (TP without sequence parallel): its weight becomes a Replicate
    DTensor (foreach AdamW and clipping refuse a mix of DTensors and plain tensors), the plain input is wrapped as
    Replicate and the output unwrapped, with no collective either way; the weight's gradient comes out Replicate."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def wrap(mod, inputs, mesh):
            return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False) for x in inputs)

        return distribute_module(module, device_mesh, input_fn=wrap,
                                 output_fn=lambda mod, out, mesh: out.to_local())


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
    # Attention takes (x, rope_cache): x as one Replicate DTensor (gathered from the sequence shards, or wrapped),
    # the (plain, full) RoPE table left alone.
    plan |= {
        "attention_norm": SequenceParallel() if sequence_parallel else ReplicatedNorm(),
        "attention": prepare_input(input_layouts=(stream, None), desired_input_layouts=(Replicate(), None)),
        "ffn_norm": SequenceParallel() if sequence_parallel else ReplicatedNorm(),
        "feed_forward": prepare_input(input_layouts=(stream,), desired_input_layouts=(Replicate(),)),
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
    plan["norm"] = SequenceParallel() if sequence_parallel else ReplicatedNorm()
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, loss_parallel_enabled: bool,
                          async_tp: bool = False, sequence_parallel: bool = True, float8: bool = False) -> None:
    """Shard `model` (on the meta device, before FSDP) over `tp_mesh` in place.

    float8: the model's linears were converted to float8 with tensorwise scaling; blocks whose linears all were
    get the float8 styles (see the module docstring).
    async_tp turns on inductor's micro-pipelined TP (CUDA + torch.compile only; the Trainer refuses it elsewhere).
    sequence_parallel=False: plain TP over a replicated residual stream (see the module docstring), for training
    (parallelism.enable_sequence_parallel = false) and for inference.
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


@torch.no_grad()
def reduce_partial_grads(params: list[nn.Parameter]) -> None:
    """Sum every gradient that is a Partial DTensor (sequence-parallel norm weights under TP without FSDP) over its
    Partial mesh dims, with one all-reduce per (mesh, placements) group, and store it Replicate there. A no-op when
    no gradient is Partial. Call after the last backward of a step, before the gradients are read."""
    groups: dict[tuple, list[nn.Parameter]] = {}
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
            groups.setdefault((g.device_mesh, g.placements), []).append(p)
    for (mesh, placements), group in groups.items():
        local = [p.grad.to_local() for p in group]
        flat = torch.cat([t.reshape(-1) for t in local])
        for dim, pl in enumerate(placements):
            if isinstance(pl, Partial):
                op = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.AVG}[pl.reduce_op]
                dist.all_reduce(flat, op=op, group=mesh.get_group(dim))
        reduced = tuple(Replicate() if pl.is_partial() else pl for pl in placements)
        for p, t, part in zip(group, local, flat.split([t.numel() for t in local])):
            p.grad = DTensor.from_local(part.view_as(t), mesh, reduced, run_check=False,
                                        shape=p.grad.shape, stride=p.grad.stride())
