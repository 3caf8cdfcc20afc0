"""Model converters (torchtitan's `model.converters`): module swaps applied to the whole model on the meta device,
right after it is built and before it is cut into pipeline stages and parallelized. The model file knows nothing
of them.

"quantize.linear.float8" (also by its older name "float8") is float8 training of nn.Linear through torchao: each
converted linear casts its input, weight and output gradient to float8 with dynamic scales and runs its matmuls
in float8, or, with `emulate`, in the parameter dtype on the float8-rounded values (to test on hardware without
float8). torchao's Float8Linear keeps `weight` and `bias`, so state-dict names, DCP checkpoints and the HF export
are those of the plain model. With FSDP, `enable_fsdp_float8_all_gather` all-gathers the weight shards in float8,
and `precompute_float8_dynamic_scale_for_fsdp` computes every weight's scale in one all-reduce after the optimizer
step (`post_optimizer_hook`) instead of one per layer in the next forward.

"quantize.linear.mx" (MX-FP8) is known and passes DRY_RUN for CUDA, but is refused on CPU, and on a GPU when the
run starts: it needs compute capability 10.x, and torchao 0.18 no longer has the MXLinearConfig API that
torchtitan v0.2.2's [quantize.linear.mx] keys configure.
"""

import dataclasses
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import ConfigError, JobConfig
from trainer.parallel_dims import ParallelDims

FLOAT8 = "quantize.linear.float8"
MX = "quantize.linear.mx"
ALIASES = {"float8": FLOAT8}
"""Older torchtitan names still in its TOML files (its llama3_405b.toml says converters = ["float8"])."""
AUTO_FILTER = "auto_filter_small_kn"
"""A filter_fqns entry that lets torchao skip linears too small to gain from float8."""
INSTALL = "pip install -e .[float8]"
MX_HARDWARE = "an NVIDIA GPU of compute capability 10.x (e.g. B200)"


def converter_names(cfg: JobConfig) -> list[str]:
    """model.converters with older names replaced by the registered ones."""
    return [ALIASES.get(name, name) for name in cfg.model.converters]


def float8_tensorwise(cfg: JobConfig) -> bool:
    """Float8 with tensorwise scaling (no recipe, or the tensorwise one), which torchao's float8 tensor-parallel
    styles and float8 all-gather are made for."""
    return FLOAT8 in converter_names(cfg) and cfg.quantize.linear.float8.recipe_name in (None, "tensorwise")


def _fsdp_float8_all_gather(cfg: JobConfig, dims: ParallelDims) -> bool:
    """Asked for, and FSDP shards the weights (over dp_shard x cp), so there is an all-gather to make float8."""
    return cfg.quantize.linear.float8.enable_fsdp_float8_all_gather and dims.dp_shard * dims.cp > 1


def _torchao_float8(cfg: JobConfig):
    try:
        import torchao.float8
    except ImportError:
        raise ConfigError(f"model.converters = {cfg.model.converters}: float8 training needs torchao, which is not "
                          f"installed; {INSTALL}") from None
    return torchao.float8


def check_converters(cfg: JobConfig, dims: ParallelDims, device_type: str) -> None:
    """Planning-time checks of model.converters and [quantize.linear.*] for a run on `device_type`; ConfigError."""
    names, known = cfg.model.converters, (FLOAT8, MX, *ALIASES)
    for name in names:
        if name not in known:
            raise ConfigError(f"model.converters = {names}: {name!r} is not a converter; known: {', '.join(known)} "
                              f"(float8 is {FLOAT8} by its older name)")
    resolved = converter_names(cfg)
    if len(set(resolved)) < len(resolved) or {FLOAT8, MX} <= set(resolved):
        raise ConfigError(f"model.converters = {names}: name one linear converter once ({FLOAT8} or {MX})")
    if FLOAT8 in resolved:
        _check_float8(cfg, dims, device_type)
    if MX in resolved and device_type != "cuda":
        raise ConfigError(f"model.converters = {names}: MX training needs {MX_HARDWARE}, but this run is on "
                          f"{device_type}; remove {MX}")


def _check_float8(cfg: JobConfig, dims: ParallelDims, device_type: str) -> None:
    f, key = cfg.quantize.linear.float8, "quantize.linear.float8"
    float8 = _torchao_float8(cfg)
    if device_type != "cuda" and not f.emulate:
        raise ConfigError(f"model.converters = {cfg.model.converters}: float8 matmuls need an NVIDIA GPU of compute "
                          f"capability 8.9+ (e.g. H100), but this run is on {device_type}; set {key}.emulate = true")
    if f.recipe_name is not None:
        recipes = [r.value for r in float8.config.Float8LinearRecipeName]
        if f.recipe_name not in recipes:
            raise ConfigError(f"{key}.recipe_name = {f.recipe_name!r} is not one of {', '.join(recipes)} (or unset)")
        if f.enable_fsdp_float8_all_gather:
            raise ConfigError(f"{key}.recipe_name = {f.recipe_name!r} with enable_fsdp_float8_all_gather = true: "
                              f"float8 all-gather is configured only without a recipe; unset one of them")


def check_hardware(cfg: JobConfig, device: torch.device) -> None:
    """When a run starts on a GPU: its compute capability can run the converters; ConfigError if not."""
    names = converter_names(cfg)
    if device.type != "cuda" or not names:
        return
    major, minor = torch.cuda.get_device_capability(device)
    if FLOAT8 in names and (major, minor) < (8, 9) and not cfg.quantize.linear.float8.emulate:
        raise ConfigError(f"model.converters = {cfg.model.converters}: float8 matmuls need compute capability 8.9+ "
                          f"(e.g. H100), this GPU has {major}.{minor}; set quantize.linear.float8.emulate = true")
    if MX in names:
        has = "" if major == 10 else f", this GPU has {major}.{minor}"
        raise ConfigError(f"model.converters = {cfg.model.converters}: MX training needs {MX_HARDWARE}{has}, and "
                          f"torchao 0.18 lacks the MXLinearConfig API of torchtitan v0.2.2; not implemented yet")


def _float8_filter(filter_fqns: list[str], recipe: str | None) -> Callable[[nn.Module, str], bool]:
    """Which modules to convert: linears whose name contains no filter_fqns entry, with both dims multiples of 16
    (float8 matmuls need that); with auto_filter_small_kn, torchao's filter also skips those too small to gain."""
    fqns = [fqn for fqn in filter_fqns if fqn != AUTO_FILTER]
    if AUTO_FILTER in filter_fqns:
        from torchao.float8 import _auto_filter_for_recipe

        return _auto_filter_for_recipe(recipe or "tensorwise", filter_fqns=fqns)

    def convert_it(module: nn.Module, fqn: str) -> bool:
        return (isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0
                and not any(f in fqn for f in fqns))

    return convert_it


def convert(model: nn.Module, cfg: JobConfig, dims: ParallelDims) -> None:
    """Apply model.converters to the whole `model` (on meta, before pipeline split and parallelize) in place;
    with model.print_after_conversion, rank 0 prints the module tree."""
    if FLOAT8 in converter_names(cfg):
        f = cfg.quantize.linear.float8
        float8 = _torchao_float8(cfg)
        if f.recipe_name is None:
            config = float8.Float8LinearConfig(enable_fsdp_float8_all_gather=_fsdp_float8_all_gather(cfg, dims),
                                               emulate=f.emulate)
        else:
            # torchao's recipes leave emulate off; keep the user's, so a recipe can be tried on CPU too.
            config = dataclasses.replace(float8.Float8LinearConfig.from_recipe_name(f.recipe_name), emulate=f.emulate)
            if f.recipe_name != "tensorwise":
                import torch._inductor.config

                # As torchtitan does for rowwise scaling: compiled casts round like eager ones (pytorch#150859).
                torch._inductor.config.emulate_precision_casts = True
        float8.convert_to_float8_training(model, config=config,
                                          module_filter_fn=_float8_filter(f.filter_fqns, f.recipe_name))
    if cfg.model.print_after_conversion and (not dist.is_initialized() or dist.get_rank() == 0):
        print(f"model after conversion ({', '.join(cfg.model.converters) or 'no converters'}):\n{model}", flush=True)


def post_optimizer_hook(cfg: JobConfig, dims: ParallelDims) -> Callable[[list[nn.Module]], None] | None:
    """What to run on the model parts after every optimizer step, or None: with float8 all-gather and
    precompute_float8_dynamic_scale_for_fsdp, every float8 weight's scale for the next all-gather, in one
    all-reduce of the weights' amax."""
    f = cfg.quantize.linear.float8
    if not (FLOAT8 in converter_names(cfg) and _fsdp_float8_all_gather(cfg, dims)
            and f.precompute_float8_dynamic_scale_for_fsdp):
        return None
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    def precompute_scales(parts: list[nn.Module]) -> None:
        for part in parts:
            precompute_float8_dynamic_scale_for_fsdp(part)

    return precompute_scales
