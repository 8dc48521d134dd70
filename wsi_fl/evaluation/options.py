"""How a checkpoint is evaluated (threshold, bootstrap, attention maps), standard library only.

Apart from :mod:`wsi_fl.evaluation.evaluate` (which imports h5py, numpy and
torch) so that ``wsi-fl evaluate`` takes its options and their defaults from
here without importing any of them. A field's ``metadata["option"]`` names its
command-line option where that differs from the field's name, and
``metadata["help"]`` is the option's help text (``wsi_fl.cli._args``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from wsi_fl.errors import ConfigError

#: What ``wsi-fl evaluate --split`` scores (wsi_fl.evaluation.heldout): the held-out test split of the model's
#: training (the default), its validation split, or every slide given.
SPLIT_CHOICES = ("test", "val", "all")


@dataclass(frozen=True)
class EvalOptions:
    threshold: float = field(default=0.5, metadata={"help": "on P(positive class)"})  # P(last class), binary
    n_bootstrap: int = field(default=1000, metadata={"option": "bootstrap",
                                                     "help": "bootstrap resamples for the AUC CI (0: none)"})
    seed: int = field(default=0, metadata={"help": "seed of the bootstrap resamples"})
    heatmap_slides: tuple[str, ...] = ()  # slide ids to draw attention maps for
    heatmap_top_k: int = field(default=0, metadata={"help": "also draw the k slides most likely positive"})
    top_tiles: int = 10  # tiles classified "High attention" in the GeoJSON

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"the threshold is a probability, in [0, 1], not {self.threshold}")
        for name in ("n_bootstrap", "heatmap_top_k", "top_tiles"):
            if getattr(self, name) < 0:
                raise ConfigError(f"EvalOptions.{name} must be >= 0, not {getattr(self, name)}")
