"""The one typed training configuration, each setting defined once (:mod:`~medtransfer.config.settings`).

- :mod:`~medtransfer.config.setting`: what a setting is (help, flag, check, resume rule, when it is read);
- :mod:`~medtransfer.config.settings`: :class:`TrainConfig`, every setting with its description;
- :mod:`~medtransfer.config.values`: bounded YAML, coercion to each setting's type, "did you mean";
- :mod:`~medtransfer.config.rules`: settings the chosen training path would ignore, refused;
- :mod:`~medtransfer.config.resolve`: a new or resumed run's settings and folder;
- :mod:`~medtransfer.config.schema`: the JSON Schema (`medtransfer config --schema`).

The `train` flags are generated from the same fields (:mod:`medtransfer.cli.train_command`).
"""

from medtransfer.config.resolve import (
    EFFECTIVE_BATCH, RESUME_OVERRIDABLE, default_cache_dir, parse_set_values, resolve_train_config,
)
from medtransfer.config.rules import ignored_settings, uses_feature_probe
from medtransfer.config.setting import Setting, flag_name
from medtransfer.config.settings import DISTRIBUTED, MAX_IMAGE_SIZE, TrainConfig
from medtransfer.config.values import MAX_NAME, MAX_NAMES, parse_class_map, read_yaml, shown

__all__ = [
    "DISTRIBUTED", "EFFECTIVE_BATCH", "MAX_IMAGE_SIZE", "MAX_NAME", "MAX_NAMES", "RESUME_OVERRIDABLE", "Setting",
    "TrainConfig", "default_cache_dir", "flag_name", "ignored_settings", "parse_class_map", "parse_set_values",
    "read_yaml", "resolve_train_config", "shown", "uses_feature_probe",
]
