"""Every key of torchtitan v0.2.2's JobConfig, from TORCHTITAN_KEYS: known, documented in --help, accepted at
torchtitan's default, and, where this trainer lacks the feature, refused elsewhere with one line naming the key.

torchtitan's defaults come from tests/assets/torchtitan_style/every_key.toml, which spells each key at that value.
"""

import re
import sys
from pathlib import Path

import pytest

from trainer.config import ConfigError, help_text, load_config
from trainer.config.job_config import JobConfig
from trainer.config.torchtitan_keys import TORCHTITAN_KEYS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "tests/assets/torchtitan_style"
EVERY_KEY = ASSETS / "every_key.toml"
OURS_ONLY = {"metrics.peak_flops", "parallelism.context_parallel_load_balance", "parallelism.enable_sequence_parallel",
             "parallelism.context_parallel_replicate_parameters"}


def _flatten(table: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _torchtitan_defaults() -> dict:
    """Key -> torchtitan's default: the asset's values, and None for the keys its comments list as unset."""
    text = EVERY_KEY.read_text()
    defaults, section = _flatten(tomllib.loads(text)), None
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif line.startswith("# unset here"):
            defaults.update({f"{section}.{key}": None for key in line.split(":", 1)[1].replace(",", " ").split()})
    return defaults


TT_DEFAULTS = _torchtitan_defaults()


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _leaf_keys(obj, prefix: str = "") -> set[str]:
    out = set()
    for name, value in vars(obj).items():
        out |= _leaf_keys(value, f"{prefix}{name}.") if hasattr(value, "__dataclass_fields__") else {prefix + name}
    return out


def _cli(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(value)
    return "none" if value is None else str(value)


def test_table_is_every_torchtitan_key_and_our_extras_are_known():
    assert len(TORCHTITAN_KEYS) == 149  # torchtitan v0.2.2's JobConfig
    assert set(TT_DEFAULTS) == set(TORCHTITAN_KEYS), "every_key.toml and the table disagree"
    assert _leaf_keys(JobConfig()) - set(TORCHTITAN_KEYS) == OURS_ONLY
    assert set(TORCHTITAN_KEYS) <= _leaf_keys(JobConfig())
    for key, s in TORCHTITAN_KEYS.items():
        assert s.status in ("implemented", "planned", "never"), key
        assert (s.status == "implemented") == (s.accepted == ()), key  # planned/never keys say what they accept
        assert s.status == "implemented" or s.why, key


def test_unimplemented_keys_keep_torchtitans_default():
    defaults = JobConfig()
    for key, s in TORCHTITAN_KEYS.items():
        if s.status != "implemented":
            assert _get(defaults, key) == TT_DEFAULTS[key], key


def test_every_key_is_in_help_with_a_docstring():
    lines = help_text().splitlines()
    documented = {}
    for flag, doc in zip(lines, lines[1:]):
        if m := re.match(r"  --(\S+) \(", flag):
            documented[m.group(1)] = doc.strip()
    for key, s in TORCHTITAN_KEYS.items():
        assert documented.get(key), f"{key} has no docstring in --help"
        if s.status != "implemented":
            assert "accepted" in documented[key], f"--help does not say what {key} accepts"
    for section in ("[training.dataloader]", "[validation.dataloader]", "[quantize.linear.float8]", "[comm]"):
        assert section in lines


@pytest.mark.parametrize("key", list(TORCHTITAN_KEYS))
def test_accepted_at_torchtitans_default(key, monkeypatch):
    monkeypatch.chdir(ROOT)  # relative asset paths stay as written when they exist from here
    cfg = load_config([f"--{key}", _cli(TT_DEFAULTS[key])])
    assert _get(cfg, key) == TT_DEFAULTS[key]


def _refused_value(key: str):
    """A value outside the key's accepted ones, of the key's type."""
    s, default = TORCHTITAN_KEYS[key], _get(JobConfig(), key)
    if isinstance(default, bool):
        value = not default
    elif isinstance(default, (int, float)):
        value = default + 7
    elif isinstance(default, str):
        value = "something_else"
    elif isinstance(default, list):
        value = ["something_else"]
    else:  # unset by default: 7 reads as a number, or as a file or module name
        value = 7
    return None if value in s.accepted else value


REFUSABLE = [k for k, s in TORCHTITAN_KEYS.items() if s.accepted and _refused_value(k) is not None]


@pytest.mark.parametrize("key", REFUSABLE)
def test_refused_outside_accepted_values_in_one_line(key):
    value = _refused_value(key)
    with pytest.raises(ConfigError) as e:
        load_config([f"--{key}", _cli(value)])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{key} = ") and "leave it" in msg, msg
    assert TORCHTITAN_KEYS[key].why in msg


def test_refusals_cover_the_unimplemented_keys():
    with_values = {k for k, s in TORCHTITAN_KEYS.items() if s.accepted}
    assert with_values == set(REFUSABLE)
    assert "llama3 has no experts" in TORCHTITAN_KEYS["parallelism.expert_parallel_degree"].why


def test_every_key_toml_loads():
    cfg = load_config(["--job.config_file", str(EVERY_KEY)])
    assert cfg.optimizer.implementation == "fused" and cfg.activation_checkpoint.mode == "selective"
    assert cfg.training.dataloader.num_workers == 0 and cfg.quantize.linear.mx.filter_fqns == ["output"]
    assert cfg.parallelism.context_parallel_load_balance is True


def test_torchtitan_style_run_loads_where_expected():
    cfg = load_config(["--job.config_file", str(ASSETS / "llama3_debug.toml")])
    assert cfg.model.hf_assets_path == "./tests/assets/tokenizer"  # from tokenizer_path
    assert (cfg.training.seq_len, cfg.validation.steps, cfg.debug.seed) == (256, 2, 7)
    assert cfg.validation.dataloader.persistent_workers is False
    float8 = cfg.quantize.linear.float8
    assert float8.filter_fqns == ["output"] and float8.recipe_name == "tensorwise"
    assert cfg.quantize.grouped_mm.float8.fqns == "experts"  # torchtitan's list[str] | str takes either
    assert cfg.fault_tolerance.group_size == 4 and cfg.activation_checkpoint.memory_budget == 0.3


BALANCER, BALANCE = "--parallelism.context_parallel_load_balancer", "--parallelism.context_parallel_load_balance"


@pytest.mark.parametrize("args,expected", [
    ([], (True, "headtail")),
    ([BALANCER, "headtail"], (True, "headtail")),
    ([BALANCER, "none"], (False, None)),
    ([BALANCE, "false"], (False, None)),
    ([BALANCER, "none", BALANCE, "false"], (False, None)),
    ([BALANCER, "headtail", BALANCE, "true"], (True, "headtail")),
])
def test_load_balancer_maps_onto_ours(args, expected):
    p = load_config(args).parallelism
    assert (p.context_parallel_load_balance, p.context_parallel_load_balancer) == expected


@pytest.mark.parametrize("args,expected", [
    ([BALANCER, "none", BALANCE, "true"], "context_parallel_load_balancer = none contradicts "
                                          "parallelism.context_parallel_load_balance = true; set only one"),
    ([BALANCER, "headtail", BALANCE, "false"], "= headtail contradicts"),
    ([BALANCER, "ptrr"], "context_parallel_load_balancer = 'ptrr' balances FlexAttention"),
    ([BALANCER, ""], "context_parallel_load_balancer = '' is not one of headtail, none"),
])
def test_load_balancer_refusals(args, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(args)


def test_tokenizer_path_is_hf_assets_path():
    assert load_config(["--model.tokenizer_path", "/x/tok"]).model.hf_assets_path == "/x/tok"
    with pytest.raises(ConfigError, match="model.tokenizer_path = '/x/tok' contradicts model.hf_assets_path"):
        load_config(["--model.tokenizer_path", "/x/tok", "--model.hf_assets_path", "/y"])


@pytest.mark.parametrize("args,expected", [
    (["--activation_checkpoint.mode", "memory_budget"],
     "activation_checkpoint.mode = 'memory_budget' needs the model compiled"),
    (["--activation_checkpoint.mode", "memory_budget", "--compile.enable", "true", "--compile.components", "loss"],
     "activation_checkpoint.mode = 'memory_budget' needs the model compiled"),
    (["--activation_checkpoint.memory_budget", "1.5"], "activation_checkpoint.memory_budget = 1.5 must be in [0, 1]"),
    (["--activation_checkpoint.determinism_check", "strict"],
     "activation_checkpoint.determinism_check = 'strict' is not one of default, none"),
    (["--activation_checkpoint.mode", "full", "--activation_checkpoint.debug", "true", "--compile.enable", "true"],
     "activation_checkpoint.debug = true works only for eager checkpoints"),
    (["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op",
      "--activation_checkpoint.debug", "true"], "activation_checkpoint.debug = true works only for eager checkpoints"),
])
def test_activation_checkpoint_refusals(args, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)) as e:
        load_config(args)
    assert "\n" not in str(e.value)


def test_memory_budget_and_debug_accepted_where_they_run():
    cfg = load_config(["--activation_checkpoint.mode", "memory_budget", "--activation_checkpoint.memory_budget", "0",
                       "--compile.enable", "true"])
    assert cfg.activation_checkpoint.memory_budget == 0
    assert load_config(["--activation_checkpoint.mode", "full", "--activation_checkpoint.debug", "true"])


def test_converter_keys_are_implemented_or_refused_where_they_run():
    # float8 is implemented (trainer/converters.py); MX is known but refused when a run starts, so its keys are
    # accepted at any value and --help says who reads them.
    float8 = [k for k in TORCHTITAN_KEYS if k.startswith("quantize.linear.float8.")]
    assert len(float8) == 5
    for key in ["model.converters", "model.print_after_conversion", *float8]:
        assert TORCHTITAN_KEYS[key].status == "implemented", key
    for key in (k for k in TORCHTITAN_KEYS if k.startswith("quantize.linear.mx.")):
        s = TORCHTITAN_KEYS[key]
        assert s.status == "planned" and s.accepted is None and "compute capability 10.x" in s.why, key
    cfg = load_config(["--model.converters", "float8", "--model.print_after_conversion",
                       "--quantize.linear.float8.recipe_name", "rowwise"])
    assert cfg.model.converters == ["float8"] and cfg.quantize.linear.float8.recipe_name == "rowwise"
    assert load_config(["--model.converters", '["quantize.linear.float8"]']).model.converters == [
        "quantize.linear.float8"]
