"""A job.custom_config_module and experimental.custom_import for the tests: a new config section, and a new
llama3 flavor registered on import."""

from dataclasses import dataclass, field

from trainer.config.job_config import JobConfig as BaseJobConfig
from trainer.models.flavors import register_flavor
from trainer.models.llama import ModelArgs

register_flavor("llama3", "tiny_test", ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=2048,
                                                   ffn_hidden=128))


@dataclass
class Extra:
    temperature: float = 1.0
    """A key of the new section."""
    enabled: bool = False
    """A switch of the new section."""


@dataclass
class JobConfig(BaseJobConfig):
    extra: Extra = field(default_factory=Extra)
    """A section this module adds."""
