"""Which parts of a block compile correctly under tensor parallel: gradients per compile scope vs eager, same TP.

    PYTHONPATH=. OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 scripts/compile_tp_scopes.py \
        block feed_forward attention norms loss attention:aot_eager

Builds the debug model at tp=2 (sequence and loss parallel, as training runs it) on this machine's device, compiles
the named scope in every block (block, feed_forward, attention, norms, or several joined by "+") or the loss, runs one forward and backward
on a fixed batch, and prints, per scope, the loss's relative difference from the eager run and the worst
relative gradient difference over parameters (max |g - g_eager| / max |g_eager|), with the parameters above 1e-5.
A scope's backend defaults to inductor; "attention:aot_eager" picks another. trainer/parallel/compile.py decides
from these figures what to compile on CPU with tensor parallel: re-run this when torch changes.
"""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from trainer.models.flavors import get_model_args
from trainer.models.llama import Transformer
from trainer.parallel.tensor_parallel import apply_tensor_parallel, loss_context
from trainer.torch_private import set_autograd_cache
from trainer.weights import init_weights


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def loss_and_grads(args, mesh, device, tokens, scope: str, backend: str):
    torch.compiler.reset()
    with torch.device("meta"):
        model = Transformer(args)
    apply_tensor_parallel(model, mesh, loss_parallel_enabled=True)
    for block in model.layers.values():
        scopes = {"block": [block], "feed_forward": [block.feed_forward], "attention": [block.attention],
                  "norms": [block.attention_norm, block.ffn_norm]}
        for module in [m for name in scope.split("+") for m in scopes.get(name, [])]:
            module.compile(backend=backend, fullgraph=True)
    init_weights(model, seed=7, device=device)

    def cross_entropy(logits, labels):
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1))

    if scope == "loss":
        cross_entropy = torch.compile(cross_entropy, backend=backend, fullgraph=True)
    logits = model(tokens[:, :-1])
    with loss_context(True):
        loss = cross_entropy(logits, tokens[:, 1:])
        loss.backward()
    return full(loss).item(), {n: full(p.grad) for n, p in model.named_parameters()}


def main() -> None:
    dist.init_process_group()
    set_autograd_cache(False)  # as the trainer runs TP: a warm cache returns wrong graphs over DTensors
    device = torch.device("cuda", dist.get_rank()) if torch.cuda.is_available() else torch.device("cpu")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("tp",))
    args = get_model_args("llama3", "debugmodel")
    args.max_seq_len = 64
    tokens = torch.randint(0, args.vocab_size, (4, 65), generator=torch.Generator().manual_seed(0)).to(device)
    ref_loss, ref = loss_and_grads(args, mesh, device, tokens, "eager", "inductor")
    for spec in sys.argv[1:]:
        scope, _, backend = spec.partition(":")
        try:
            loss, grads = loss_and_grads(args, mesh, device, tokens, scope, backend or "inductor")
            rel = {n: ((grads[n] - ref[n]).abs().max() / ref[n].abs().max()).item() for n in ref}
            off = sorted(n for n, r in rel.items() if r > 1e-5)
            line = (f"{spec}: loss {abs(loss - ref_loss) / ref_loss:.1e}, worst gradient {max(rel.values()):.1e}; "
                    f"{len(off)} of {len(rel)} parameters above 1e-5{': ' + ', '.join(off[:4]) if off else ''}")
        except Exception as e:  # noqa: BLE001  (a crash is one of the outcomes this script reports)
            line = f"{spec}: fails: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        if dist.get_rank() == 0:
            print(line, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
