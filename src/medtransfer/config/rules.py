"""Settings a chosen training path does not read: a changed value is refused, never dropped in silence.

Each setting names, in its own definition (``read_when``), the conditions under which it is read;
here each condition says when it does not hold, why, and the fix. Only values that differ from the
default count as set.

    >>> from medtransfer.config import TrainConfig
    >>> ignored_settings(TrainConfig(strategy="linear-probe", augment="none", label_smoothing=0.1))[0][:60]
    "--label-smoothing: got 0.1, but the linear probe on cached fe"
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from medtransfer.config.setting import flag_name
from medtransfer.config.settings import TrainConfig

__all__ = ["CONDITIONS", "Condition", "ignored_settings", "uses_feature_probe"]


def uses_feature_probe(config: TrainConfig) -> bool:
    """A linear probe without augmentation trains its head on features computed once."""
    return config.strategy == "linear-probe" and config.augment == "none"


@dataclass(frozen=True)
class Condition:
    """A training path that reads some settings: `fails` says when it is not taken."""

    fails: Callable[[TrainConfig], bool]
    reason: str  # completes "got VALUE, but ..."
    fix: str


CONDITIONS: dict[str, Condition] = {
    "lightning": Condition(
        uses_feature_probe,
        "the linear probe on cached features (strategy linear-probe, augment none) ignores it: the head trains "
        "with plain cross-entropy, shuffled batches and a constant learning rate on one device",
        "remove the setting, or set --augment light to train through Lightning"),
    "augmenting": Condition(lambda c: c.augment == "none", "augment is none, so no augmentation is applied",
                            "remove the setting, or choose --augment light, radiograph or trivial"),
    "strategy-freeze": Condition(lambda c: c.strategy != "freeze", "only --strategy freeze freezes a number of children",
                                 "remove the setting, or use --strategy freeze"),
    "strategy-lp-ft": Condition(lambda c: c.strategy != "lp-ft", "only --strategy lp-ft has a linear-probe phase",
                                "remove the setting, or use --strategy lp-ft"),
    "strategy-gradual": Condition(lambda c: c.strategy != "gradual", "only --strategy gradual unfreezes during training",
                                  "remove the setting, or use --strategy gradual"),
    "trains-backbone": Condition(lambda c: c.strategy == "linear-probe",
                                 "a linear probe trains only the head, which always gets --lr",
                                 "remove the setting, or use another strategy"),
    "ema": Condition(lambda c: c.weight_averaging != "ema", "only --weight-averaging ema uses it",
                     "remove the setting, or use --weight-averaging ema"),
    "focal": Condition(lambda c: c.loss != "focal", "only --loss focal uses it", "remove the setting, or use --loss focal"),
    "drawn-split": Condition(lambda c: bool(c.split_file), "--split-file gives the split as is",
                             "remove the setting, or leave out --split-file"),
}


def ignored_settings(config: TrainConfig) -> list[str]:
    """One message per setting (changed from its default) that the chosen path ignores."""
    defaults = TrainConfig()
    messages = []
    for key, condition in CONDITIONS.items():
        if not condition.fails(config):
            continue
        for name, meta in TrainConfig.settings().items():
            value = getattr(config, name)
            if key in meta.read_when and value != getattr(defaults, name):
                messages.append(f"{flag_name(name)}: got {value!r}, but {condition.reason}; {condition.fix}")
    return messages
