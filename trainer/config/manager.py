"""Build a JobConfig from defaults, a TOML file and CLI overrides, then check it (validate(), in checks.py).

Precedence: `--section.key value` (or `--section.key=value`) on the command line > the TOML file named by
`--job.config_file` > the dataclass defaults. A nested section is a `[a.b]` table in TOML and `--a.b.key` on the
command line. Every mistake a user can make raises ConfigError with one line naming the key, the value and the fix;
the entry point prints it and exits non-zero without a traceback.
"""

import ast
import dataclasses
import importlib
import json
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

from trainer.config.checks import ConfigError, check, check_load_balancer, show, suggest, validate
from trainer.config.job_config import JobConfig
from trainer.config.torchtitan_keys import TORCHTITAN_KEYS

REPO_ROOT = Path(__file__).resolve().parents[2]


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
            raise ConfigError(f"unknown config {what}{suggest(part, fields)}")
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


def _status_note(name: str) -> str:
    """What --help adds for a torchtitan key this trainer does not implement."""
    s = TORCHTITAN_KEYS.get(name)
    if s is None or s.status == "implemented":
        return ""
    if s.accepted is None:
        return f" [any value accepted: {s.why}]"
    head = s.why if s.status == "planned" else f"not supported: {s.why}"
    return f" [{head}; accepted: {', '.join(map(show, s.accepted))}]"


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
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section]{suggest(section, sections)}")
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
    check_load_balancer(p.context_parallel_load_balancer)  # before it is mapped onto ours
    if balancer in explicit:
        on = p.context_parallel_load_balancer == "headtail"
        check(balance not in explicit or p.context_parallel_load_balance == on,
              f"{balancer} = {p.context_parallel_load_balancer or 'none'} contradicts {balance} = "
              f"{show(p.context_parallel_load_balance)}; set only one of them")
        p.context_parallel_load_balance = on
    else:
        p.context_parallel_load_balancer = "headtail" if p.context_parallel_load_balance else None
    if m.tokenizer_path is not None:
        check("model.hf_assets_path" not in explicit or m.hf_assets_path == m.tokenizer_path,
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
