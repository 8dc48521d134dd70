"""Slide-level learning with no Flower in it: bag datasets, patient-level splits, the training loop, local and
pooled fitting.

Everything a federation's site trains with lives here, so a model trained locally, pooled or federated goes
through the same code (``wsi_fl.site`` calls it once per round). ``Site`` (a hospital's feature directory and
labels) is defined here because local, pooled and federated runs all start from it.
"""

from wsi_fl._lazy import lazy_exports

_EXPORTS = {
    "BagRecord": "data",
    "FeatureBagDataset": "data",
    "TableBagDataset": "data",
    "read_labels": "data",
    "train_val_test_split": "splits",
    "patient_kfold": "splits",
    "TrainConfig": "config",
    "train_model": "training",
    "predict": "training",
    "Site": "fit",
    "FitResult": "fit",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
