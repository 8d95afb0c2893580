"""`auto` hyperparameters: epochs, batch size and learning rate chosen from the data and method.

The rules follow what hosted fine-tuning services do by default: aim for a few thousand
training examples seen in total (more passes over small sets, fewer over large ones), a
batch that grows with the data set, and the method's usual peak learning rate.
"""

from __future__ import annotations

import dataclasses
import math

from finesmith.config import AUTO, DEFAULT_LR, TrainConfig

TARGET_EPOCHS = 3
MIN_EXAMPLES_SEEN, MAX_EXAMPLES_SEEN = 100, 25_000
MAX_AUTO_EPOCHS = 25


def auto_epochs(n_examples: int) -> int:
    """3 passes, raised so at least 100 examples are seen, lowered so at most 25,000 are."""
    if n_examples * TARGET_EPOCHS < MIN_EXAMPLES_SEEN:
        return min(MAX_AUTO_EPOCHS, math.ceil(MIN_EXAMPLES_SEEN / n_examples))
    if n_examples * TARGET_EPOCHS > MAX_EXAMPLES_SEEN:
        return max(1, MAX_EXAMPLES_SEEN // n_examples)
    return TARGET_EPOCHS


def auto_batch_size(n_examples: int) -> int:
    """A power of two near n/64 (about 64 steps per epoch), between 4 and 32."""
    target = max(1, n_examples // 64)
    return min(32, max(4, 1 << (target - 1).bit_length()))


def resolve_auto(config: TrainConfig, n_examples: int) -> tuple[TrainConfig, dict[str, float | int]]:
    """Replace every `auto` value (and an unset lr) with a concrete one.

    Args:
        config: the run config.
        n_examples: trainable examples after tokenization.
    Returns:
        (config with numbers only, {key: chosen value} for the keys that were auto).
    """
    chosen: dict[str, float | int] = {}
    if config.epochs == AUTO:
        chosen["epochs"] = float(auto_epochs(n_examples))
    if config.batch_size == AUTO:
        chosen["batch_size"] = auto_batch_size(n_examples)
    if config.lr is None or config.lr == AUTO:
        chosen["lr"] = DEFAULT_LR[config.method]
    return dataclasses.replace(config, **chosen), chosen
