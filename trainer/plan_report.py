"""DRY_RUN --plan's report: the table of the best layouts that fit, why the others were dropped, and the command
line and TOML that run the best one; and the command line itself (trainer/dry_run.py, scripts/plan.py)."""

import sys

from trainer.config import ConfigError, JobConfig, load_config
from trainer.device_profiles import DEVICES, GiB, DeviceProfile, device_profile
from trainer.planner import MEMORY_PARTS, PlanResult, no_fit_error, plan


def _flops(f: float) -> str:
    return f"{f / 1e12:,.0f} TFLOP/s" if f >= 1e12 else f"{f / 1e9:,.1f} GFLOP/s"


def _seconds(t: float) -> str:
    return f"{t:.3f}" if t >= 0.001 else f"{t:.1e}"


def _gib(b: float) -> str:
    return f"{b / GiB:.1f}"


def format_plan(result: PlanResult, cfg: JobConfig, world_size: int, device: DeviceProfile, top: int) -> str:
    lines = [f"plan: {cfg.model.name} {cfg.model.flavor}, seq_len {cfg.training.seq_len}, global batch "
             f"{cfg.training.global_batch_size}, on {world_size} x {device.name} ({_gib(device.memory_bytes)} GiB "
             f"each, {_flops(device.peak_flops)} peak at {device.achievable:.0%} achievable); "
             f"memory in GiB on the fullest rank"]
    header = ("#", "layout", "pp schedule", "AC", "reshard", "lbs", "accum", *MEMORY_PARTS, "total", "step s",
              "tok/s/dev", "MFU")
    rows = [header]
    for i, e in enumerate(result.fits[:top], 1):
        L = e.layout
        rows.append((str(i), L.describe(), f"{L.schedule} mb {L.microbatch_size}" if L.pp > 1 else "-", L.ac_mode,
                     L.reshard, str(L.local_batch), str(e.accum_steps), *(_gib(e.memory[p]) for p in MEMORY_PARTS),
                     _gib(e.memory["total"]), _seconds(e.seconds["total"]), f"{e.tokens_per_second:,.0f}",
                     f"{e.mfu:.1%}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(c.rjust(w) if i not in (1, 2, 3, 4) else c.ljust(w) for i, (c, w) in
                        enumerate(zip(r, widths))) for r in rows]
    n_valid = len(result.fits) + len(result.oom)
    lines.append(f"{len(result.fits)} of {n_valid} valid layouts fit ({top if len(result.fits) > top else 'all'} "
                 f"shown); dropped: {len(result.oom)} out of memory"
                 + (f" (leanest needs {_gib(result.oom[0].memory['total'])} GiB)" if result.oom else "")
                 + "".join(f", {n} refused by {k}" for k, n in sorted(result.dropped.items(), key=lambda kv: -kv[1])))
    for k, msg in sorted(result.examples.items()):
        lines.append(f"  e.g. {msg}")
    if result.fits:
        best = result.fits[0].layout
        changed = {k: v for k, v in best.overrides().items() if _get(cfg, k) != v}
        flags = " ".join(f"--{k} {_value(v)}" for k, v in changed.items())
        lines.append(f"run the best: NGPU={world_size} ./run_train.sh --job.config_file {cfg.job.config_file} {flags}")
        sections: dict[str, list[str]] = {}
        for k, v in best.overrides().items():
            section, name = k.split(".")
            sections.setdefault(section, []).append(f"{name} = {_value(v, toml=True)}")
        lines += [f"[{s}]\n" + "\n".join(kv) for s, kv in sections.items()]
    return "\n".join(lines)


def _value(v, toml: bool = False) -> str:
    """A layout key's value on the command line or in TOML (true/false; strings quoted in TOML)."""
    if isinstance(v, bool):
        return str(v).lower()
    return f'"{v}"' if toml and isinstance(v, str) else str(v)


def _get(cfg: JobConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def plan_main(argv: list[str], world_size: int) -> int:
    """DRY_RUN=1 ... --plan [--device NAME] [--gpus-per-node N] [--top K] [config overrides]; exit status."""
    opts = {"--device": "h100", "--gpus-per-node": "8", "--top": "10"}
    rest, i = [], 0
    while i < len(argv):
        if argv[i] in opts and i + 1 < len(argv):
            opts[argv[i]] = argv[i + 1]
            i += 2
        else:
            rest.append(argv[i])
            i += 1
    device = opts["--device"]
    if device not in DEVICES:
        print(f"error: --device {device!r}: expected one of {', '.join(DEVICES)}", file=sys.stderr)
        return 2
    gpus_per_node = world_size if device == "cpu" else int(opts["--gpus-per-node"])
    try:
        cfg = load_config(rest)
        result = plan(cfg, world_size, device, gpus_per_node)
        if not result.fits:
            raise ConfigError(no_fit_error(cfg, result, world_size, device, gpus_per_node))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(result, cfg, world_size, device_profile(device, world_size), int(opts["--top"])))
    return 0
