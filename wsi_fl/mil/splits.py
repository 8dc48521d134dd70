"""Patient-level splits: no patient's slides on both sides of any split.

Slides of one patient share tissue, staining and scanner; a model evaluated on a
patient it was trained on is scored on what it memorised. All splits here are
therefore over groups (patient ids) and stratified by the slide target as far as
the grouping allows, built on scikit-learn's ``StratifiedGroupKFold``.

Indices returned are sorted ``int64`` arrays into the sample order given.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from preprocessing.h5format import FeatureFileError, check_feature_file
from wsi_fl.errors import ConfigError
from wsi_fl.mil.data import SPLIT_NAMES, BagRecord

log = logging.getLogger("wsi_fl.mil")

#: The most folds :func:`train_val_split` uses to approximate a fraction (0.05 steps at worst).
_MAX_FRACTION_FOLDS = 20


def _as_arrays(targets: Any, groups: Any) -> tuple[np.ndarray, np.ndarray]:
    y, g = np.asarray(targets), np.asarray(groups)
    if y.ndim != 1 or g.shape != y.shape:
        raise ValueError(f"targets and groups must be 1-D of equal length, got {y.shape} and {g.shape}")
    if y.size == 0:
        raise ConfigError("no samples to split")
    return y, g


def patient_kfold(targets: Any, groups: Any, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_splits`` (train, test) folds; every sample is in exactly one test fold, every patient in one fold.

    Raises ``ValueError`` when some class has fewer patients than folds, since some
    test fold would then have no example of it (scikit-learn only warns).
    """
    y, g = _as_arrays(targets, groups)
    if n_splits < 2:
        raise ConfigError(f"n_splits must be >= 2, got {n_splits}")
    for cls in np.unique(y):
        n_patients = np.unique(g[y == cls]).size
        if n_patients < n_splits:
            raise ConfigError(
                f"class {cls} has only {n_patients} patient(s), fewer than n_splits={n_splits}: use fewer folds"
            )
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return [(np.sort(tr), np.sort(te)) for tr, te in cv.split(np.zeros(y.size), y, g)]


def train_val_split(targets: Any, groups: Any, val_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out about ``val_frac`` of the samples, whole patients only, stratified as far as possible.

    Uses ``m`` of ``k`` stratified group folds with ``m/k`` closest to ``val_frac``
    (``k <= 20`` and at most the number of patients; smallest ``k`` on ties, since
    fewer folds balance better). With few patients the fraction is approximate.
    """
    y, g = _as_arrays(targets, groups)
    if not 0 < val_frac < 1:
        raise ConfigError(f"val_frac must be in (0, 1), got {val_frac}")
    n_groups = np.unique(g).size
    if n_groups < 2:
        raise ConfigError(f"need at least 2 patients to split, got {n_groups}")
    largest_class = int(np.unique(y, return_counts=True)[1].max())
    if largest_class < 2:  # one slide per class (a tiny site's remainder): stratification is moot
        patients = np.random.default_rng(seed).permutation(np.unique(g))
        held = patients[: min(max(round(val_frac * n_groups), 1), n_groups - 1)]
        val = np.flatnonzero(np.isin(g, held))
        return np.setdiff1d(np.arange(y.size), val), val
    # StratifiedGroupKFold refuses k above the largest class count; capping k also keeps folds non-empty.
    k_max = min(_MAX_FRACTION_FOLDS, n_groups, largest_class)
    k_max = max(k_max, 2)
    best = min(
        ((k, min(max(round(val_frac * k), 1), k - 1)) for k in range(2, k_max + 1)),
        key=lambda km: (abs(km[1] / km[0] - val_frac), km[0]),
    )
    k, m = best
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # Rare classes simply miss some folds here; that is the "as far as possible".
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        folds = [te for _, te in cv.split(np.zeros(y.size), y, g)]
    val = np.sort(np.concatenate(folds[:m]))
    train = np.setdiff1d(np.arange(y.size), val)
    if val.size == 0 or train.size == 0:
        raise ConfigError(f"could not split {n_groups} patients at val_frac={val_frac}")
    return train, val


def train_val_test_split(
    targets: Any, groups: Any, *, val_frac: float = 0.15, test_frac: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patient-disjoint (train, val, test); fractions are of the whole set.

    Test is held out first, then val from the rest at ``val_frac / (1 - test_frac)``.
    """
    y, g = _as_arrays(targets, groups)
    if not (0 < val_frac < 1 and 0 < test_frac < 1 and val_frac + test_frac < 1):
        raise ConfigError(f"need 0 < val_frac, test_frac and val_frac + test_frac < 1, got {val_frac}, {test_frac}")
    rest, test = train_val_split(y, g, test_frac, seed)
    train_r, val_r = train_val_split(y[rest], g[rest], val_frac / (1 - test_frac), seed)
    return rest[train_r], rest[val_r], test


def _shared_patient(groups: np.ndarray, named_sets: Sequence[tuple[str, np.ndarray]]) -> str | None:
    owner: dict[Any, str] = {}
    for name, idx in named_sets:
        for patient in np.unique(groups[np.asarray(idx, dtype=np.int64)]):
            if patient in owner and owner[patient] != name:
                return f"patient {patient} is in both {owner[patient]} and {name}"
            owner[patient] = name
    return None


def assert_patient_disjoint(groups: Any, *index_sets: Any) -> None:
    """Raise ``ValueError`` naming a patient whose samples fall in two of ``index_sets``."""
    g = np.asarray(groups)
    problem = _shared_patient(g, [(f"index set {i}", idx) for i, idx in enumerate(index_sets)])
    if problem:
        raise ValueError(problem)


def splits_from_column(records: Sequence[BagRecord]) -> dict[str, np.ndarray] | None:
    """Indices per predefined split (``train``/``val``/``test``), or ``None`` if no record has one.

    Either all records carry a split or none: a partly filled column is an error,
    as is a patient whose slides sit in two splits.
    """
    missing = [r.slide_id for r in records if r.split is None]
    if len(missing) == len(records):
        return None
    if missing:
        raise ConfigError(f"split column partly filled: {len(missing)} slide(s) without a split, e.g. {missing[0]}")
    splits = np.array([r.split for r in records])
    unknown = sorted(set(splits.tolist()) - set(SPLIT_NAMES))
    if unknown:
        raise ConfigError(f"unknown split name(s) {unknown}; expected {SPLIT_NAMES}")
    out = {name: np.flatnonzero(splits == name) for name in SPLIT_NAMES if (splits == name).any()}
    problem = _shared_patient(np.array([r.patient_id for r in records]), list(out.items()))
    if problem:
        raise ConfigError(f"predefined splits not patient-disjoint: {problem}")
    return out


def assign_splits(records: Sequence[BagRecord], val_frac: float, test_frac: float, seed: int) -> dict[str, np.ndarray]:
    """One site's split (the rule :data:`wsi_fl.mil.config.SPLIT_RULE` names): the labels' split column when
    every row has one, else patient-level and stratified with these fractions and seed. A function of the
    records and these values only, so ``wsi-fl evaluate`` redraws it from a checkpoint's split record."""
    predefined = splits_from_column(records)
    if predefined is not None:
        return predefined
    targets = np.array([r.target for r in records])
    groups = np.array([r.patient_id for r in records])
    if test_frac == 0 and val_frac == 0:
        return {"train": np.arange(len(records))}
    if test_frac == 0:  # every slide for training and validation, e.g. before an external evaluation
        train, val = train_val_split(targets, groups, val_frac, seed)
        return {"train": train, "val": val}
    if val_frac == 0:  # no epoch selection (fixed epochs): every non-test slide trains
        train, test = train_val_split(targets, groups, test_frac, seed)
        return {"train": train, "test": test}
    train, val, test = train_val_test_split(targets, groups, val_frac=val_frac, test_frac=test_frac, seed=seed)
    return {"train": train, "val": val, "test": test}


def leave_one_site_out(site_names: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``(held_out, train_sites)`` for every site, in the order given: validation on an unseen hospital.

    A held-out split of the training sites' own slides shares their scanners, stains and patients' hospital; a
    hospital that took no part in training is the deployment question. Needs at least two distinct names, so
    that every fold trains on something.
    """
    names = [str(n) for n in site_names]
    if len(names) < 2:
        raise ConfigError(f"leave-one-site-out needs at least 2 sites, got {len(names)}")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"site {dup!r} is named twice: leave-one-site-out needs distinct site names")
    return [(held, [n for n in names if n != held]) for held in names]


def site_fold_indices(sites_of_samples: Sequence[str], held_out: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) sample indices of one leave-one-site-out fold: test is every sample of ``held_out``."""
    s = np.asarray([str(x) for x in sites_of_samples])
    test = np.flatnonzero(s == held_out)
    if test.size == 0:
        raise ConfigError(f"no sample of site {held_out!r} to hold out")
    train = np.flatnonzero(s != held_out)
    if train.size == 0:
        raise ConfigError(f"holding out {held_out!r} leaves nothing to train on")
    return train, test


def has_no_tiles(path: Path) -> bool:
    """Whether ``path`` is a complete feature file with zero tiles (a slide preprocessing reported ``empty``)."""
    try:
        return path.is_file() and check_feature_file(path).n_tiles == 0
    except FeatureFileError:
        return False  # damaged: FeatureBagDataset says what is wrong with it


def drop_empty_slides(records: Sequence[BagRecord], features_dir: Path,
                      say: Callable[[str], None] = log.warning) -> list[BagRecord]:
    """``records`` without the slides whose feature file has no tiles, each left out with a message.

    Such a slide (no tissue tile; manifest status ``empty``) has nothing to learn from or to score. It is left
    out before any split is drawn, by training, by a federated site and by ``wsi-fl evaluate`` alike, so that
    all three split the same slides. A missing or damaged feature file is still an error (FeatureBagDataset).
    """
    kept = []
    for rec in records:
        if has_no_tiles(features_dir / f"{rec.slide_id}.h5"):
            say(f"slide {rec.slide_id} left out: its feature file has no tiles (preprocessing status empty)")
        else:
            kept.append(rec)
    return kept


def labels_digest(records: Sequence[BagRecord]) -> str:
    """A digest of what a site's split is drawn from (slide, label, patient, split of each labelled slide).

    A survival record's label is its event, so its follow-up time joins the line: a site whose times changed
    since training is told so, not told its labels are unchanged. Classification digests are as before.
    """
    h = hashlib.sha256()
    for r in sorted(records, key=lambda r: r.slide_id):
        fields = (r.slide_id, r.label, r.patient_id, r.split or "", *(() if r.time is None else (repr(float(r.time)),)))
        h.update("\t".join(fields).encode() + b"\n")
    return f"sha256:{h.hexdigest()}"
