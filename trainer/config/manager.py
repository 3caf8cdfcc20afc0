"""Build a JobConfig from defaults, a TOML file and CLI overrides, and check it.

Precedence: `--section.key value` (or `--section.key=value`) on the command line > the TOML file named by
`--job.config_file` > the dataclass defaults. A nested section is a `[a.b]` table in TOML and `--a.b.key` on the
command line. Every mistake a user can make raises ConfigError with one line naming the key, the value and the fix;
the entry point prints it and exits non-zero without a traceback.
"""

import ast
import dataclasses
import importlib
import json
import difflib
import inspect
import sys
import types
import typing
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

from trainer.config.job_config import JobConfig
from trainer.config.torchtitan_keys import TORCHTITAN_KEYS

REPO_ROOT = Path(__file__).resolve().parents[2]


class ConfigError(ValueError):
    """A user error in the configuration: the message is one line naming the key, the value and the fix."""


def _is_section(tp) -> bool:
    return dataclasses.is_dataclass(tp)


def _fields(cls=JobConfig, prefix: str = "") -> typing.Iterator[tuple[str, dataclasses.Field, type]]:
    """(dotted name, field, the dataclass holding it) of every section and key of the schema, depth first, each
    section before its keys."""
    for f in dataclasses.fields(cls):
        yield prefix + f.name, f, cls
        if _is_section(f.type):
            yield from _fields(f.type, f"{prefix}{f.name}.")


def _field_docs(schema: type = JobConfig) -> dict[str, str]:
    """Docstrings written under dataclass fields by dotted name, read from the source of the modules that define
    the schema's classes (they are not kept at runtime)."""
    by_class: dict[tuple[str, str], dict[str, str]] = {}
    modules = {schema.__module__, *(owner.__module__ for _, _, owner in _fields(schema))}
    for module in modules:
        for node in ast.parse(inspect.getsource(sys.modules[module])).body:
            if not isinstance(node, ast.ClassDef):
                continue
            docs = by_class.setdefault((module, node.name), {})
            for prev, cur in zip(node.body, node.body[1:]):
                if (isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name)
                        and isinstance(cur, ast.Expr) and isinstance(cur.value, ast.Constant)
                        and isinstance(cur.value.value, str)):
                    docs[prev.target.id] = " ".join(cur.value.value.split())
    # A field declared in a base class is documented there.
    def doc(owner: type, key: str) -> str:
        return next((by_class.get((c.__module__, c.__name__), {}).get(key) for c in owner.__mro__
                     if key in by_class.get((c.__module__, c.__name__), {})), "")
    return {name: doc(owner, f.name) for name, f, owner in _fields(schema)}


def _field(name: str, section: bool = False, schema: type = JobConfig) -> dataclasses.Field:
    """The schema's field at dotted `name` (a section if `section`, else a key); a ConfigError naming the closest
    valid name when there is none."""
    cls, parts = schema, name.split(".")
    for depth, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        here, want_section = ".".join(parts[:depth + 1]), section or depth < len(parts) - 1
        f = fields.get(part)
        if f is None:
            what = f"section [{here}]" if want_section else f"key {here}"
            raise ConfigError(f"unknown config {what}{_suggest(part, fields)}")
        if want_section and not _is_section(f.type):
            raise ConfigError(f"{here} is a key, not a section: set it as {here} = value")
        if not want_section and _is_section(f.type):
            first = next(k for k, sub, _ in _fields(f.type, here + ".") if not _is_section(sub.type))
            raise ConfigError(f"{here} is a section, not a key: set its keys, e.g. {first}")
        cls = f.type
    return f


def _get(cfg: JobConfig, name: str):
    for part in name.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _suggest(name: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(sorted(options))}"


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value, tp, from_cli: bool):
    """Convert `value` (a TOML value, or a string from the CLI) to the field type `tp`, or raise ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and from_cli and isinstance(value, str) and value.lower() in ("none", "null"):
            return None
        errors = []
        for inner in (a for a in args if a is not type(None)):  # the first type that takes the value
            try:
                return _coerce(key, value, inner, from_cli)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        if from_cli and isinstance(value, str) and value.lstrip().startswith("["):  # nested lists: TOML syntax
            try:
                value = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                raise ConfigError(f"{key} = {value!r}: not a valid TOML list, e.g. [[\"a\", \"b\"], [\"c\"]]") from None
        elif from_cli and isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, list):
            raise ConfigError(f"{key} = {value!r}: expected a list of {_type_name(args[0])}")
        return [_coerce(key, v, args[0], from_cli) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_cli and isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ConfigError(f"{key} = {value!r}: expected true or false")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: expected {tp.__name__}, got a boolean")
        if from_cli and isinstance(value, str):
            try:
                value = int(value) if tp is int else float(value)
            except ValueError:
                raise ConfigError(f"{key} = {value!r}: expected {tp.__name__}") from None
        if tp is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, (int, float)) or (tp is int and not isinstance(value, int)):
            raise ConfigError(f"{key} = {value!r}: expected {tp.__name__}")
        return tp(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r}: expected a string (quote it in TOML)")
        return value
    raise TypeError(f"unsupported config field type {tp} for {key}")  # a bug in the schema, not user input


def _set(cfg: JobConfig, name: str, value, from_cli: bool) -> None:
    f = _field(name, schema=type(cfg))
    section = name.rpartition(".")[0]
    setattr(_get(cfg, section) if section else cfg, f.name, _coerce(name, value, f.type, from_cli))


def _toml_items(table: dict, schema: type, prefix: str = "") -> typing.Iterator[tuple[str, object]]:
    """(dotted key, value) of every value in a TOML table, checking each [table] on the way is a section."""
    for key, value in table.items():
        if isinstance(value, dict):
            _field(prefix + key, section=True, schema=schema)
            yield from _toml_items(value, schema, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def _parse_cli(argv: list[str]) -> list[tuple[str, str | None]]:
    """`--a.b v`, `--a.b=v`, `--a.b.c v`, and a bare `--a.b` (a boolean switch) -> [(dotted key, raw or None)].
    Dashes in names read as underscores (`--job.config-file`), as torchtitan's CLI allows."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key value")
        name, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                raw, i = argv[i + 1], i + 1
            else:
                raw = None
        out.append((name.replace("-", "_"), raw))
        i += 1
    return out


def _is_switch(tp) -> bool:
    """A boolean field, or an optional one (unset: decided at run time)."""
    return tp is bool or (typing.get_origin(tp) in (typing.Union, types.UnionType)
                          and set(typing.get_args(tp)) == {bool, type(None)})


def _switch(name: str, schema: type) -> tuple[str, str]:
    """A bare `--a.b` sets a boolean to true and `--a.no_b` (torchtitan's negation) to false; (key, raw value)."""
    section, _, key = name.rpartition(".")
    negated = f"{section}.{key[3:]}"
    if key.startswith("no_") and key[3:]:
        try:
            if _is_switch(_field(negated, schema=schema).type):
                return negated, "false"
        except ConfigError:
            pass
    if not _is_switch(_field(name, schema=schema).type):
        raise ConfigError(f"--{name} needs a value")
    return name, "true"


def _show(value) -> str:
    """A value as a TOML file spells it."""
    if isinstance(value, bool):
        return str(value).lower()
    return "unset" if value is None else repr(value)


def _status_note(name: str) -> str:
    """What --help adds for a torchtitan key this trainer does not implement."""
    s = TORCHTITAN_KEYS.get(name)
    if s is None or s.status == "implemented":
        return ""
    if s.accepted is None:
        return f" [any value accepted: {s.why}]"
    head = s.why if s.status == "planned" else f"not supported: {s.why}"
    return f" [{head}; accepted: {', '.join(map(_show, s.accepted))}]"


def help_text() -> str:
    """Every section and field with its type, default and docstring."""
    docs, lines = _field_docs(), ["usage: run_train.sh [--section.key value ...]   (or CONFIG_FILE=... / --job.config_file)"]
    defaults = JobConfig()
    for name, f, _ in _fields():
        if _is_section(f.type):
            lines.append(f"\n[{name}]")
            if docs.get(name):  # nested sections carry a docstring, top-level ones are named for what they hold
                lines.append(f"  {docs[name]}")
        else:
            lines.append(f"  --{name} ({_type_name(f.type)}, default {_get(defaults, name)!r})")
            lines.append(f"      {docs.get(name, '')}{_status_note(name)}")
    return "\n".join(lines)


def _without_unset(data: dict) -> dict:
    """A config as nested dicts without its unset (None) keys, which TOML cannot spell."""
    return {k: _without_unset(v) if isinstance(v, dict) else v for k, v in data.items() if v is not None}


def save_config(cfg: JobConfig, path: Path) -> Path:
    """Write the resolved config to `path` and return it: TOML, which --job.config_file loads again, or JSON for a
    .json name, as torchtitan writes it."""
    data = _without_unset(dataclasses.asdict(cfg))
    data["job"].pop("config_file", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n" if path.suffix == ".json" else tomli_w.dumps(data))
    return path


def _import(key: str, module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{key} = {module!r} cannot be imported ({e}); give a dotted module name on the Python "
                          f"path (the working directory and the repository are on it)") from None


def _schema(experimental_import: str, custom_config_module: str) -> type:
    """The JobConfig to read the config with: experimental.custom_import is imported first (it may register model
    flavors), then job.custom_config_module's JobConfig, a subclass of ours that adds sections or keys."""
    if experimental_import:
        _import("experimental.custom_import", experimental_import)
    if not custom_config_module:
        return JobConfig
    schema = getattr(_import("job.custom_config_module", custom_config_module), "JobConfig", None)
    if not (isinstance(schema, type) and issubclass(schema, JobConfig) and dataclasses.is_dataclass(schema)):
        raise ConfigError(f"job.custom_config_module = {custom_config_module!r} has no JobConfig dataclass that "
                          f"extends trainer.config.JobConfig; define `@dataclass class JobConfig(JobConfig)` there")
    return schema


def load_config(argv: list[str] | None = None) -> JobConfig:
    """Defaults, then the TOML file, then the CLI overrides; validated. Raises ConfigError on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parsed = _parse_cli(argv)
    given = dict(parsed)  # the last value of each flag given on the command line
    config_file, data = given.get("job.config_file"), {}
    if config_file is not None:
        config_file = _coerce("job.config_file", config_file, _field("job.config_file").type, from_cli=True)
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"job.config_file = {str(path)!r}: no such file; give the path of a TOML file")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML ({e})") from None
        sections = [f.name for f in dataclasses.fields(JobConfig)]
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section]{_suggest(section, sections)}")
    # Modules that extend the schema are named on the command line or in the file, and read before either.
    from_file = {f"{section}.{key}": value for section in ("job", "experimental")
                 for key, value in data.get(section, {}).items()}
    schema = _schema(*(given.get(key) or from_file.get(key) or ""
                       for key in ("experimental.custom_import", "job.custom_config_module")))
    overrides = [(name, raw) if raw is not None else _switch(name, schema) for name, raw in parsed]
    cfg, explicit = schema(), set()
    if config_file:
        _set(cfg, "job.config_file", config_file, from_cli=True)
    for name, value in _toml_items(data, schema):
        if name != "job.config_file":
            _set(cfg, name, value, from_cli=False)
            explicit.add(name)
    for name, raw in overrides:
        if name != "job.config_file":
            _set(cfg, name, raw, from_cli=True)
            explicit.add(name)
    _apply_torchtitan_names(cfg, explicit)
    validate(cfg)
    _resolve_asset_paths(cfg)
    return cfg


def _apply_torchtitan_names(cfg: JobConfig, explicit: set[str]) -> None:
    """torchtitan keys that name a setting of ours differently: whichever of the two was set decides both (the
    trainer reads ours); both set and disagreeing is an error."""
    p, m = cfg.parallelism, cfg.model
    balancer, balance = "parallelism.context_parallel_load_balancer", "parallelism.context_parallel_load_balance"
    _check_load_balancer(p.context_parallel_load_balancer)  # before it is mapped onto ours
    if balancer in explicit:
        on = p.context_parallel_load_balancer == "headtail"
        _check(balance not in explicit or p.context_parallel_load_balance == on,
               f"{balancer} = {p.context_parallel_load_balancer or 'none'} contradicts {balance} = "
               f"{_show(p.context_parallel_load_balance)}; set only one of them")
        p.context_parallel_load_balance = on
    else:
        p.context_parallel_load_balancer = "headtail" if p.context_parallel_load_balance else None
    if m.tokenizer_path is not None:
        _check("model.hf_assets_path" not in explicit or m.hf_assets_path == m.tokenizer_path,
               f"model.tokenizer_path = {m.tokenizer_path!r} contradicts model.hf_assets_path = {m.hf_assets_path!r}; "
               f"tokenizer_path is the former name of hf_assets_path: set only hf_assets_path")
        m.hf_assets_path, m.tokenizer_path = m.tokenizer_path, None  # one name from here on


def _resolve_asset_paths(cfg: JobConfig) -> None:
    """Relative asset paths mean the working directory first, then the repository (where the shipped configs'
    assets live), so run_train.sh works from any directory. dump_folder stays relative to the working directory."""
    for section, key in (("model", "hf_assets_path"), ("training", "dataset_path"), ("validation", "dataset_path")):
        value = getattr(getattr(cfg, section), key)
        if value and not Path(value).is_absolute() and not Path(value).exists() and (REPO_ROOT / value).exists():
            setattr(getattr(cfg, section), key, str(REPO_ROOT / value))


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _one_of(key: str, value, choices) -> None:
    _check(value in choices, f"{key} = {value!r} is not one of {', '.join(map(str, choices))}")


def _check_load_balancer(value) -> None:
    key = "parallelism.context_parallel_load_balancer"
    _check(value != "ptrr", f"{key} = 'ptrr' balances FlexAttention, but attention here is SDPA; use headtail (or "
                            f"none to turn balancing off)")
    _check(value in ("headtail", None), f"{key} = {value!r} is not one of headtail, none (none: on the CLI only)")


def _check_torchtitan_keys(cfg: JobConfig) -> None:
    """A torchtitan key of a feature this trainer lacks is accepted only at a value that leaves the feature off."""
    for name, s in TORCHTITAN_KEYS.items():
        value = _get(cfg, name)
        if s.accepted and value not in s.accepted:  # () for implemented keys, None for any value
            leave = "unset" if s.accepted[0] is None else f"at {_show(s.accepted[0])}"
            raise ConfigError(f"{name} = {_show(value)}: {s.why}; leave it {leave}")


def validate(cfg: JobConfig) -> None:
    """Every check that needs only the config (layout checks that need the world size live in ParallelDims)."""
    t, p, o, s, m = cfg.training, cfg.parallelism, cfg.optimizer, cfg.lr_scheduler, cfg.metrics
    for key, value in (("training.local_batch_size", t.local_batch_size), ("training.seq_len", t.seq_len),
                       ("training.gc_freq", t.gc_freq), ("metrics.log_freq", m.log_freq),
                       ("parallelism.data_parallel_replicate_degree", p.data_parallel_replicate_degree),
                       ("parallelism.tensor_parallel_degree", p.tensor_parallel_degree),
                       ("parallelism.pipeline_parallel_degree", p.pipeline_parallel_degree),
                       ("parallelism.context_parallel_degree", p.context_parallel_degree)):
        _check(value >= 1, f"{key} = {value} must be >= 1")
    _check(t.steps >= 0, f"training.steps = {t.steps} must be >= 0")
    _check(p.data_parallel_shard_degree == -1 or p.data_parallel_shard_degree >= 1,
           f"parallelism.data_parallel_shard_degree = {p.data_parallel_shard_degree} must be -1 (the rest) or >= 1")
    _check(t.global_batch_size == -1 or t.global_batch_size >= 1,
           f"training.global_batch_size = {t.global_batch_size} must be -1 (local x dp) or >= 1")
    _one_of("parallelism.context_parallel_rotate_method", p.context_parallel_rotate_method, ("allgather", "alltoall"))
    _check(p.pipeline_parallel_microbatch_size >= 1,
           f"parallelism.pipeline_parallel_microbatch_size = {p.pipeline_parallel_microbatch_size} must be >= 1")
    _check(p.pipeline_parallel_layers_per_stage is None or p.pipeline_parallel_layers_per_stage >= 1,
           f"parallelism.pipeline_parallel_layers_per_stage = {p.pipeline_parallel_layers_per_stage} must be >= 1 "
           f"(or left unset)")
    for key, value in (("parallelism.pipeline_parallel_first_stage_less_layers",
                        p.pipeline_parallel_first_stage_less_layers),
                       ("parallelism.pipeline_parallel_last_stage_less_layers",
                        p.pipeline_parallel_last_stage_less_layers)):
        _check(value >= 0, f"{key} = {value} must be >= 0")
    _check(p.pipeline_parallel_degree == 1 or t.local_batch_size % p.pipeline_parallel_microbatch_size == 0,
           f"training.local_batch_size = {t.local_batch_size} is not a multiple of "
           f"parallelism.pipeline_parallel_microbatch_size = {p.pipeline_parallel_microbatch_size}; make it one")
    _one_of("training.mixed_precision_param", t.mixed_precision_param, ("auto", "float32", "bfloat16"))
    _one_of("training.mixed_precision_reduce", t.mixed_precision_reduce, ("float32", "bfloat16"))
    _one_of("training.dtype", t.dtype, ("float32", "bfloat16"))
    _check(t.dtype == "float32" or t.mixed_precision_param != "float32",
           f"training.dtype = {t.dtype!r} with mixed_precision_param = 'float32': the weights are stored in {t.dtype} "
           f"and would only be upcast for compute; set mixed_precision_param = 'bfloat16' (or auto), or training.dtype "
           f"= 'float32' for float32 master weights")
    _check(not o.early_step_in_backward or t.max_norm <= 0,
           f"optimizer.early_step_in_backward = true with training.max_norm = {t.max_norm}: clipping needs the norm "
           f"over every gradient, but each parameter is stepped as soon as its own is ready; set "
           f"training.max_norm = 0, or early_step_in_backward = false")
    _check(not o.early_step_in_backward or p.pipeline_parallel_degree == 1,
           f"optimizer.early_step_in_backward = true with parallelism.pipeline_parallel_degree = "
           f"{p.pipeline_parallel_degree}: a schedule runs several microbatches' backwards per step, and each would "
           f"step the optimizer; set early_step_in_backward = false (or pipeline_parallel_degree = 1)")
    _one_of("parallelism.fsdp_reshard_after_forward", p.fsdp_reshard_after_forward, ("default", "always", "never"))
    _one_of("optimizer.name", o.name, ("AdamW", "Adam"))
    _one_of("optimizer.implementation", o.implementation, ("auto", "for-loop", "foreach", "fused"))
    _one_of("lr_scheduler.decay_type", s.decay_type, ("linear", "sqrt", "cosine"))
    _check(o.lr > 0, f"optimizer.lr = {o.lr} must be > 0")
    _check(o.eps > 0, f"optimizer.eps = {o.eps} must be > 0")
    _check(o.weight_decay >= 0, f"optimizer.weight_decay = {o.weight_decay} must be >= 0")
    for key, value in (("optimizer.beta1", o.beta1), ("optimizer.beta2", o.beta2)):
        _check(0 <= value < 1, f"{key} = {value} must be in [0, 1)")
    _check(s.warmup_steps >= 0, f"lr_scheduler.warmup_steps = {s.warmup_steps} must be >= 0")
    _check(s.total_steps is None or s.total_steps >= 1,
           f"lr_scheduler.total_steps = {s.total_steps} must be >= 1 (or left unset for training.steps)")
    _check(s.decay_ratio is None or 0 <= s.decay_ratio <= 1,
           f"lr_scheduler.decay_ratio = {s.decay_ratio} must be in [0, 1] (or left unset)")
    _check(0 <= s.min_lr_factor <= 1, f"lr_scheduler.min_lr_factor = {s.min_lr_factor} must be in [0, 1]")
    v = cfg.validation
    _check(v.freq >= 1, f"validation.freq = {v.freq} must be >= 1 (validate every this many steps)")
    for key, value in (("validation.steps", v.steps), ("validation.local_batch_size", v.local_batch_size),
                       ("validation.seq_len", v.seq_len)):
        _check(value == -1 or value >= 1, f"{key} = {value} must be -1 or >= 1")
    # The model's RoPE table has training.seq_len rows (context parallel shards it with the sequence): no longer.
    _check(not v.enable or v.seq_len <= t.seq_len, f"validation.seq_len = {v.seq_len} exceeds training.seq_len = {t.seq_len}, the "
                                   f"length of the model's RoPE table; set it to at most {t.seq_len} (or -1)")
    _check(not (v.enable and (v.dataset or t.dataset) == "synthetic" and v.steps == -1),
           "validation.steps = -1 evaluates the whole split, but the synthetic dataset is endless; set "
           "validation.steps to a number of batches")
    ac, prof = cfg.activation_checkpoint, cfg.profiling
    _one_of("activation_checkpoint.mode", ac.mode, ("none", "full", "selective", "memory_budget"))
    compiled_model = cfg.compile.enable and "model" in cfg.compile.components
    _check(ac.mode != "memory_budget" or compiled_model,
           "activation_checkpoint.mode = 'memory_budget' needs the model compiled (the compiler's partitioner does "
           "the recomputing); set compile.enable = true with \"model\" in compile.components, or use full or selective")
    _check(0 <= ac.memory_budget <= 1, f"activation_checkpoint.memory_budget = {ac.memory_budget} must be in [0, 1]")
    _one_of("activation_checkpoint.determinism_check", ac.determinism_check, ("default", "none"))
    # torch.utils.checkpoint's debug mode refuses any context_fn: a selective policy's, and the one compile adds.
    _check(not ac.debug or not (compiled_model or (ac.mode == "selective" and ac.selective_ac_option == "op")),
           "activation_checkpoint.debug = true works only for eager checkpoints without a per-op policy (torch "
           "refuses debug with a context_fn); set compile.enable = false and use full or selective \"N\", or "
           "debug = false")
    _check(ac.selective_ac_option == "op" or (ac.selective_ac_option.isdigit() and int(ac.selective_ac_option) >= 1),
           f"activation_checkpoint.selective_ac_option = {ac.selective_ac_option!r} must be \"op\" or a positive "
           f"integer N (checkpoint every N-th block), e.g. \"2\"")
    for component in cfg.compile.components:
        _one_of("compile.components", component, ("model", "loss"))
    _check(prof.profile_freq >= 1, f"profiling.profile_freq = {prof.profile_freq} must be >= 1")
    _check(prof.profiler_warmup >= 0, f"profiling.profiler_warmup = {prof.profiler_warmup} must be >= 0")
    _check(prof.profiler_active >= 1, f"profiling.profiler_active = {prof.profiler_active} must be >= 1")
    _check(not prof.enable_profiling or prof.profiler_warmup + prof.profiler_active <= prof.profile_freq,
           f"profiling.profiler_warmup {prof.profiler_warmup} + profiler_active {prof.profiler_active} > "
           f"profile_freq {prof.profile_freq}: a window must fit between two traces; lower them or raise profile_freq")
    for section in ("training", "validation"):
        d = getattr(cfg, section).dataloader
        key = f"{section}.dataloader"
        _check(d.num_workers >= 0, f"{key}.num_workers = {d.num_workers} must be >= 0")
        _check(d.num_workers > 0 or (d.prefetch_factor is None and not d.persistent_workers),
               f"{key}: prefetch_factor and persistent_workers need worker processes; set {key}.num_workers > 0 "
               f"or leave them unset")
        _check(d.prefetch_factor is None or d.prefetch_factor >= 1,
               f"{key}.prefetch_factor = {d.prefetch_factor} must be >= 1 (or left unset)")
    _validate_checkpoint(cfg.checkpoint)
    _check_load_balancer(p.context_parallel_load_balancer)
    _check_torchtitan_keys(cfg)


# What checkpoint.exclude_from_loading may name: the top-level keys of the Trainer's checkpoints (a unit test keeps
# this and the Checkpointer in step; the config imports nothing of the trainer's).
CHECKPOINT_PARTS = ("model", "optimizer", "lr_scheduler", "dataloader", "train_state", "rng")


def _validate_checkpoint(c) -> None:
    _one_of("checkpoint.async_mode", c.async_mode, ("disabled", "async", "async_with_pinned_mem"))
    _one_of("checkpoint.export_dtype", c.export_dtype, ("float32", "bfloat16", "float16"))
    _check(c.interval >= 1, f"checkpoint.interval = {c.interval} must be >= 1")
    _check(c.keep_latest_k >= 0, f"checkpoint.keep_latest_k = {c.keep_latest_k} must be >= 0 (0 keeps all)")
    _check(c.load_step >= -1, f"checkpoint.load_step = {c.load_step} must be a step >= 0, or -1 for the newest")
    for part in c.exclude_from_loading:
        _check(part in CHECKPOINT_PARTS,
               f"checkpoint.exclude_from_loading: {part!r} is not a checkpoint part{_suggest(part, CHECKPOINT_PARTS)}")
    _check(not c.last_save_in_hf or c.last_save_model_only,
           "checkpoint.last_save_in_hf = true needs checkpoint.last_save_model_only = true (an HF folder holds only "
           "weights)")
    _check(not c.initial_load_in_hf or c.initial_load_path,
           "checkpoint.initial_load_in_hf = true needs checkpoint.initial_load_path, the HF model folder to load")
    _check(not c.initial_load_in_hf or c.initial_load_model_only,
           "checkpoint.initial_load_model_only = false with initial_load_in_hf: an HF folder holds only weights; "
           "set initial_load_model_only = true")
