"""The main job on an embedded default: a synthetic three-hospital cohort, preprocessed and modelled.

It exercises what each hospital does before federated training: generate (in
place of real scans) → tissue detection → tiling at 0.5 µm/px → features →
HDF5 + QC images, one summary line per site; then a pooled gated-attention MIL
model is trained on the sites' training slides and evaluated on held-out
slides (metrics with CI, ROC and calibration plots, attention heatmaps). It uses the light
``resnet18_trunc`` encoder with an explicit random init, because nothing may be
downloaded and the job must finish in minutes on a 2-core machine; the output
files record ``weights = random-init``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from preprocessing.encoders import create_encoder
from preprocessing.pipeline import PreprocessConfig, discover_slides, run_preprocess
from preprocessing.synth import generate_cohort

from .evaluate import EvalOptions
from .fit import FitResult, Site, fit
from .training import TrainConfig


@dataclass(frozen=True)
class SiteReport:
    site: str
    slides: int
    positives: int
    ok: int
    failed: int
    tiles: int
    seconds: float
    out_dir: Path


def run_demo(out: Path, *, sites: int = 3, slides_per_site: int = 6, seed: int = 0,
             encoder_name: str = "resnet18_trunc", progress: bool = True) -> list[SiteReport]:
    cohort = generate_cohort(out / "cohort", sites=sites, slides_per_site=slides_per_site, seed=seed,
                             progress=progress)
    encoder = create_encoder(encoder_name, random_init=True)
    reports = []
    for site in cohort:
        start = time.perf_counter()
        site_out = out / "preprocessed" / site.site
        cfg = PreprocessConfig(out_dir=site_out, encoder=encoder_name, random_init=True, progress=progress)
        results = run_preprocess(discover_slides([site.slides_dir]), cfg, encoder=encoder)
        reports.append(SiteReport(
            site=site.site, slides=len(results), positives=site.n_positive,
            ok=sum(r.status in ("ok", "skipped") for r in results),
            failed=sum(r.status == "failed" for r in results),
            tiles=sum(r.n_tiles for r in results), seconds=time.perf_counter() - start, out_dir=site_out,
        ))
    return reports


def train_demo_model(out: Path, reports: list[SiteReport], *, seed: int = 0, progress: bool = True) -> FitResult:
    """Pooled training on every site's training slides; held-out test report with attention maps."""
    sites = [Site(r.site, r.out_dir / "features", out / "cohort" / r.site / "labels.csv") for r in reports]
    slide_dirs = [out / "cohort" / r.site / "slides" for r in reports]
    # A validation split of three slides is too noisy to pick an epoch from: train a fixed 25 epochs.
    return fit(sites, out / "model", train=TrainConfig(epochs=25, seed=seed, early_stopping="none"),
               val_frac=0.15, test_frac=0.3,
               eval_opts=EvalOptions(heatmap_top_k=3, n_bootstrap=500), slide_dirs=slide_dirs, progress=progress)


def format_reports(reports: list[SiteReport]) -> str:
    lines = [f"{'site':<10}{'slides':>7}{'pos':>5}{'ok':>4}{'failed':>7}{'tiles':>7}{'sec':>7}  output"]
    for r in reports:
        lines.append(f"{r.site:<10}{r.slides:>7}{r.positives:>5}{r.ok:>4}{r.failed:>7}{r.tiles:>7}"
                     f"{r.seconds:>7.1f}  {r.out_dir}")
    return "\n".join(lines)
