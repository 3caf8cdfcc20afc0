"""Configuration: the TOML schema (job_config) and how it is loaded and checked (manager)."""

from trainer.config.job_config import JobConfig
from trainer.config.manager import ConfigError, help_text, load_config, save_config, validate

__all__ = ["ConfigError", "JobConfig", "help_text", "load_config", "save_config", "validate"]
