"""Time-to-event outcomes for the synthetic cohort (``wsi-fl synth-cohort --task survival``).

Survival models need a cohort whose times depend on what the slides show, so that a MIL model that finds the
planted tumour-like texture can rank patients by risk, and whose censoring is independent of that risk (the
assumption every C-index and Kaplan-Meier estimate here rests on). Per patient:

* **Tumour burden** ``b``: the planted (tumour-like) area of the patient's slides as a fraction of their slide
  area, averaged over the patient's slides (0 for non-responders, about 0.04-0.15 with the default preset).
* **Hazard**: Weibull proportional hazards with shape ``k`` and linear predictor
  ``eta = label * (beta_responder + beta_burden * b)``: responders die sooner, and the more of their tissue is
  tumour, the sooner. Event time ``T = scale * (E / exp(eta)) ** (1 / k)`` with ``E ~ Exp(1)``.
* **Censoring**: independent of everything above, the earlier of a uniform administrative end of follow-up
  and an exponential loss to follow-up; ``time = min(T, C)``, ``event = T <= C``.

A patient's slides share the patient's time and event. The draws come from
``numpy.random.SeedSequence([seed, site, 0x5EED])``, one stream per site apart from the pixels' and the plan's
streams, so adding this task changes no slide, label or planted region, and the same seed gives the same
times byte for byte. Times are in months, rounded to 0.1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InputError

__all__ = ["SURVIVAL_LABELS_HEADER", "SurvivalModel", "survival_rows"]

SURVIVAL_LABELS_HEADER = ("slide_id", "label", "patient_id", "time", "event")

_STREAM = 0x5EED  # keeps the survival draws apart from the cohort plan's stream (seed, site)


@dataclass(frozen=True)
class SurvivalModel:
    """How times are drawn. The defaults give a median survival of ~69 months without tumour and ~5-10 months
    for responders, and an oracle Harrell's C (true eta as the risk) of ~0.84 on 60-slide sites; since the
    non-responders all share eta = 0, a perfect responder classifier alone reaches ~0.80."""

    shape: float = 2.5  # Weibull shape k (> 1: hazard rising with time; larger: times less spread out)
    scale: float = 80.0  # months; the non-responders' Weibull scale
    beta_responder: float = 3.0  # log hazard ratio of a responder with no measurable burden
    beta_burden: float = 30.0  # log hazard ratio per unit of burden (area fraction)
    follow_up: tuple[float, float] = (36.0, 120.0)  # administrative censoring, uniform (months)
    loss_rate: float = 0.005  # loss to follow-up per month (exponential)

    def __post_init__(self) -> None:
        if not (self.shape > 0 and self.scale > 0 and self.loss_rate >= 0
                and 0 < self.follow_up[0] <= self.follow_up[1]):
            raise InputError(f"SurvivalModel: need shape, scale > 0, loss_rate >= 0 and 0 < follow-up lo <= hi, "
                             f"got {self}")


def survival_rows(plans: Sequence, planted: Sequence[tuple], seed: int, site: int,
                  model: SurvivalModel = SurvivalModel()) -> list[tuple]:
    """Rows of :data:`SURVIVAL_LABELS_HEADER` for one site's slide ``plans`` (``SlidePlan``: slide_id,
    patient_id, label, width, height) and its ``planted`` rectangles ``(slide_id, x, y, width, height)``."""
    area: dict[str, float] = {}
    for slide_id, _x, _y, w, h in planted:
        area[slide_id] = area.get(slide_id, 0.0) + float(w) * float(h)
    burden: dict[str, list[float]] = {}
    label: dict[str, int] = {}
    for p in plans:
        burden.setdefault(p.patient_id, []).append(area.get(p.slide_id, 0.0) / (p.width * p.height))
        label[p.patient_id] = int(p.label)
    rng = np.random.default_rng(np.random.SeedSequence([seed, site, _STREAM]))
    outcome: dict[str, tuple[float, int]] = {}
    for patient in sorted(burden):  # sorted: the draws do not depend on slide order
        b = float(np.mean(burden[patient]))
        eta = label[patient] * (model.beta_responder + model.beta_burden * b)
        t_event = model.scale * (rng.exponential() / np.exp(eta)) ** (1.0 / model.shape)
        end = rng.uniform(*model.follow_up)
        lost = rng.exponential(1.0 / model.loss_rate) if model.loss_rate > 0 else np.inf
        t_censor = min(end, lost)
        time = max(round(min(t_event, t_censor), 1), 0.1)  # a time of 0 would precede every risk set
        outcome[patient] = (time, int(t_event <= t_censor))
    return [(p.slide_id, p.label, p.patient_id, f"{outcome[p.patient_id][0]:.1f}", outcome[p.patient_id][1])
            for p in plans]
