"""Configuration: the TOML schema (job_config), how it is loaded (manager) and checked (checks)."""

from trainer.config.checks import ConfigError, validate
from trainer.config.job_config import JobConfig
from trainer.config.manager import help_text, load_config, save_config

__all__ = ["ConfigError", "JobConfig", "help_text", "load_config", "save_config", "validate"]
