"""The one description of a MIL model: what :func:`models.create_model` builds and a checkpoint stores.

Frozen, so a model's ``config`` cannot drift from the weights it was built
for. Each field's ``metadata["help"]`` is picked up by the CLI
(``wsi_fl.cli._args.add_dataclass_args``), so a new field is settable without
touching the CLI.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from wsi_fl.errors import ConfigError

#: ``input_norm`` values: none, or per-slide standardisation of the features (models.base.standardize_within_bag).
INPUT_NORMS = ("none", "slide")


@dataclass(frozen=True)
class MILConfig:
    model: str = field(default="gated_attention", metadata={"help": "registered model name (see models.list_models())"})
    in_dim: int = field(default=1024, metadata={"help": "instance (patch embedding) dimension"})
    n_classes: int = field(default=2, metadata={"help": "number of slide-level classes (>= 2)"})
    hidden_dim: int = field(default=512, metadata={"help": "width of the instance embedding Linear+ReLU+dropout"})
    attn_dim: int = field(default=256, metadata={"help": "width of the attention MLP"})
    dropout: float = field(default=0.25, metadata={"help": "dropout after the instance embedding"})
    k_sample: int = field(default=8, metadata={"help": "CLAM: top/bottom-k attended instances for the instance loss"})
    inst_weight: float = field(default=0.3, metadata={"help": "CLAM: weight of the instance loss in aux_loss"})
    input_norm: str = field(default="none", metadata={"help": "none, or slide: standardise each feature over the "
                                                               "slide's own tiles before the embedding (see "
                                                               "models.base.standardize_within_bag)"})
    n_extreme: int = field(default=5, metadata={"help": "chowder: R, the top-R and bottom-R tile scores kept"})
    n_heads: int = field(default=8, metadata={"help": "transmil: attention heads (must divide hidden_dim)"})

    def __post_init__(self) -> None:
        # Validate here rather than at model build time, so a bad value fails where it was written
        # (CLI, config file, checkpoint) with the field's name in the message.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "float" and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))  # JSON/CLI may give 0 for 0.0
            elif not _has_type(value, f.type):
                raise ConfigError(f"MILConfig.{f.name} must be {f.type}, not {type(value).__name__} ({value!r})")
        for name in ("in_dim", "hidden_dim", "attn_dim", "k_sample", "n_extreme", "n_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"MILConfig.{name} must be >= 1, not {getattr(self, name)}")
        if self.n_classes < 2:
            raise ConfigError(f"MILConfig.n_classes must be >= 2 (binary is 2 logits), not {self.n_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"MILConfig.dropout must be in [0, 1), not {self.dropout}")
        if self.input_norm not in INPUT_NORMS:
            raise ConfigError(f"MILConfig.input_norm must be one of {', '.join(INPUT_NORMS)}, not {self.input_norm!r}")
        if self.inst_weight < 0.0:
            raise ConfigError(f"MILConfig.inst_weight must be >= 0, not {self.inst_weight}")
        if self.model == "transmil" and self.hidden_dim % self.n_heads:
            raise ConfigError(f"MILConfig.n_heads={self.n_heads} must divide hidden_dim={self.hidden_dim} (transmil)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MILConfig:
        """Inverse of :meth:`to_dict`. Unknown keys are an error: a typo or a config from a newer
        version must not silently build a different model. Missing keys take their defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown MILConfig keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**d)


def _has_type(value: Any, type_name: str) -> bool:
    expected = {"str": str, "int": int, "float": float}[type_name]
    return isinstance(value, expected) and not isinstance(value, bool)
