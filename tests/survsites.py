"""Small real HDF5 bag sites with time-to-event labels: ``<root>/<site>/features/*.h5`` and ``labels.csv``
(``slide_id,time,event,patient_id``), the survival counterpart of :mod:`bagsites`.

A slide's hazard is ``exp(2 * f)`` with ``f`` the fraction of its instances shifted on 4 features (drawn per
slide in [0, 0.6]), times exponential with that rate, censored by an independent exponential: a MIL model that
finds the shifted instances and counts them ranks the slides by risk.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from bagsites import DIM, _attrs

from preprocessing.h5format import FeatureWriter
from wsi_fl.mil.fit import Site


def make_survival_site(root: Path, name: str, n_slides: int, seed: int, *, shift: float = 2.5,
                       censor_rate: float = 0.3) -> Site:
    rng = np.random.default_rng(seed)
    feats_dir, rows = root / name / "features", []
    for i in range(n_slides):
        slide_id = f"{name}_s{i:02d}"
        n = int(rng.integers(20, 40))
        frac = float(rng.uniform(0.0, 0.6))
        x = rng.standard_normal((n, DIM)).astype(np.float32)
        x[: round(frac * n), :4] += shift
        coords = np.stack([np.arange(n) * 448, np.zeros(n)], axis=1)
        with FeatureWriter(feats_dir / f"{slide_id}.h5", DIM, _attrs(slide_id)) as w:
            w.append(coords, x)
            w.commit()
        t_event = rng.exponential(1.0 / np.exp(4.0 * frac))
        t_censor = rng.exponential(1.0 / censor_rate)
        rows.append((slide_id, f"{min(t_event, t_censor):.4f}", int(t_event <= t_censor), f"p{i}"))
    labels = root / name / "labels.csv"
    with labels.open("w", newline="") as f:
        csv.writer(f).writerows([("slide_id", "time", "event", "patient_id"), *rows])
    return Site(name, feats_dir, labels)
