"""The main job on an embedded default: a synthetic three-hospital cohort, preprocessed site by site.

It exercises what each hospital does before federated training: generate (in
place of real scans) → tissue detection → tiling at 0.5 µm/px → features →
HDF5 + QC images, then prints one summary line per site. It uses the light
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


def run_demo(out: Path, *, sites: int = 3, slides_per_site: int = 4, seed: int = 0,
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


def format_reports(reports: list[SiteReport]) -> str:
    lines = [f"{'site':<10}{'slides':>7}{'pos':>5}{'ok':>4}{'failed':>7}{'tiles':>7}{'sec':>7}  output"]
    for r in reports:
        lines.append(f"{r.site:<10}{r.slides:>7}{r.positives:>5}{r.ok:>4}{r.failed:>7}{r.tiles:>7}"
                     f"{r.seconds:>7.1f}  {r.out_dir}")
    return "\n".join(lines)
