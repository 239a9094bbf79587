"""Run configuration: ``schema`` (the typed tree of options), ``loading`` (YAML + ``key=value``),
``validation`` (every problem at once, before any process group), ``users`` (per-user values
resolved once into ``UserSpec``s). Import the public names from here.

Import graph (no cycle): ``comigs_dist.options`` <- ``schema`` <- ``users`` <- ``validation``
<- ``loading``; ``validation`` -> ``comigs_dist.methods`` -> ``comigs_dist.options``. Methods never
import this package (tests/test_config_imports.py).
"""
from comigs_dist.config.schema import (CheckpointConfig, CommConfig, ConfigError, DataConfig, EvalConfig,
                                       FloatOrList, GroupConfig, GuardConfig, IntOrList, LogConfig, LoRAConfig,
                                       MoEConfig, ModelConfig, PrivacyConfig, RunConfig, TrainConfig)
from comigs_dist.config.users import PER_USER_KEYS, UserSpec, inferred_n_users, resolve_users, users_per_round
from comigs_dist.config.validation import (check_world_size, collect_errors, comm_group_errors, format_errors,
                                           privacy_accounting, privacy_errors, sampling_discount_withheld,
                                           validate)
from comigs_dist.config.loading import config_from_dict, describe_options, load_config, parse_override, to_yaml
from comigs_dist.options import get_dotted, opt, sub

__all__ = ["CheckpointConfig", "CommConfig", "ConfigError", "DataConfig", "EvalConfig", "FloatOrList", "GroupConfig",
           "GuardConfig", "IntOrList", "LogConfig", "LoRAConfig", "MoEConfig", "ModelConfig", "PER_USER_KEYS",
           "PrivacyConfig", "RunConfig", "TrainConfig", "UserSpec", "check_world_size", "collect_errors",
           "comm_group_errors", "config_from_dict", "describe_options", "format_errors", "get_dotted",
           "inferred_n_users", "users_per_round", "load_config", "opt", "parse_override", "privacy_accounting",
           "privacy_errors", "resolve_users", "sampling_discount_withheld", "sub", "to_yaml", "validate"]
