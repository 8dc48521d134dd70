"""Slide-level differential privacy at each site: DP-SGD over bags (``dp = "slide-dpsgd"``).

Client-level DP (:mod:`wsi_fl.privacy.central`) protects a whole hospital, and with a
few hospitals the noise it needs swamps the model. What a hospital must protect
is its patients, so here the unit is one training slide: every site trains with
DP-SGD (Abadi et al. 2016). Each step Poisson-samples the site's training bags
at rate ``q = dp-batch-size / N``, clips each sampled bag's gradient to L2 norm
``C`` (``dp-clipping-norm``), sums them, adds Gaussian noise of standard
deviation ``σ C`` and divides by the expected batch size ``q N``. Bags are
trained one at a time already, so a per-bag gradient costs nothing extra.

A site releases only what these steps produce (its weights), so every update is
(ε, δ)-DP with respect to adding or removing one of its training slides, against
the server and the other sites alike; aggregation is post-processing, so any
strategy keeps the guarantee. The noise and the sampling draw from the
operating system's entropy, not from the run's seed (which the server knows and
could otherwise use to subtract the noise), so such runs are not bit-reproducible.

Accounting: the RDP of the Poisson-subsampled Gaussian (Google's
``dp-accounting``, which Flower's accountant wraps), composed over every step of
the run, ``num-server-rounds × local-epochs × round(N / dp-batch-size)``. With
``dp-epsilon`` each site calibrates ``σ`` to it for its own ``N``; with
``dp-noise-multiplier`` it uses that. A site counts its steps in its context
state and refuses a round that would exceed the plan, and reports the ε it has
spent (``dp-epsilon``) with each update.

Assumptions and limits (also in ``docs/threat-model.md``): a site's number of
training slides is treated as public (it is sent as ``num-examples``, which
FedAvg weights by); the mean training loss is not sent (it is not private);
class weights are off (they depend on every bag's label); survival runs use the
discrete-time loss, a sum of per-slide terms on the agreed bins (Cox's terms
depend on whole risk sets and are refused); a patient with ``k``
training slides at a site is protected at group level ``k``; evaluation
metrics are outside DP; the guarantee covers one run (each site's privacy
ledger, :mod:`wsi_fl.site.ledger`, adds up runs and enforces a lifetime budget).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from dp_accounting import dp_event, rdp
from torch.utils.data import Dataset

from models import MILModel
from wsi_fl.federation.config import FedConfig
from wsi_fl.mil.data import collate_bags
from wsi_fl.mil.training import SurvivalLoss, set_epoch
from wsi_fl.privacy.central import bisect_noise

#: Integer Rényi orders: dp-accounting's fractional orders below 2 fail to converge for sampling rates of a few
#: tenths (a site with few slides) and are only dropped, with a warning per order and call.
RDP_ORDERS = (*range(2, 65), 80, 96, 128, 192, 256)


class PrivacyBudgetError(RuntimeError):
    """A round that would take a site past the privacy it planned to spend (one line)."""


@dataclass(frozen=True)
class DpSgdPlan:
    """One site's DP-SGD for one run: its noise, its sampling rate and its number of steps."""

    noise_multiplier: float
    clipping_norm: float
    sample_rate: float
    steps_per_epoch: int
    local_epochs: int
    rounds: int
    delta: float

    @property
    def steps_per_round(self) -> int:
        return self.steps_per_epoch * self.local_epochs

    @property
    def total_steps(self) -> int:
        return self.steps_per_round * self.rounds

    def epsilon(self, steps: int) -> float:
        """ε at ``delta`` after ``steps`` steps."""
        return epsilon_after(self.noise_multiplier, self.sample_rate, steps, self.delta)


def epsilon_after(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε at ``delta`` of ``steps`` Poisson-subsampled Gaussian steps (RDP accounting)."""
    if steps == 0:
        return 0.0
    accountant = rdp.RdpAccountant(RDP_ORDERS)
    event = dp_event.GaussianDpEvent(noise_multiplier)
    if sample_rate < 1.0:
        event = dp_event.PoissonSampledDpEvent(sample_rate, event)
    accountant.compose(event, steps)
    return float(accountant.get_epsilon(delta))


@lru_cache(maxsize=64)
def calibrate(target_epsilon: float, sample_rate: float, steps: int, delta: float) -> float:
    """The smallest noise multiplier (to 0.1 %) that keeps ``steps`` steps within ``target_epsilon``."""
    return bisect_noise(lambda sigma: epsilon_after(sigma, sample_rate, steps, delta), target_epsilon, delta)


def make_plan(n_train: int, *, batch_size: int, local_epochs: int, rounds: int, clipping_norm: float, delta: float,
              target_epsilon: float = 0.0, noise_multiplier: float = 0.0) -> DpSgdPlan:
    """A site's plan: ``σ`` calibrated to ``target_epsilon`` over the whole run if it is set, else as given."""
    if n_train < 1:
        raise ValueError("DP-SGD needs at least one training bag")
    sample_rate = min(1.0, batch_size / n_train)
    steps_per_epoch = max(1, round(1 / sample_rate))
    steps = steps_per_epoch * local_epochs * rounds
    sigma = calibrate(target_epsilon, sample_rate, steps, delta) if target_epsilon > 0 else noise_multiplier
    return DpSgdPlan(noise_multiplier=sigma, clipping_norm=clipping_norm, sample_rate=sample_rate,
                     steps_per_epoch=steps_per_epoch, local_epochs=local_epochs, rounds=rounds, delta=delta)


def plan_for(n_train: int, cfg: FedConfig) -> DpSgdPlan:
    """The plan a site with ``n_train`` training bags follows under the run's settings ``cfg``."""
    return make_plan(n_train, batch_size=cfg.dp_batch_size, local_epochs=cfg.local_epochs,
                     rounds=cfg.num_server_rounds, clipping_norm=cfg.dp_clipping_norm, delta=cfg.dp_delta,
                     target_epsilon=cfg.dp_epsilon, noise_multiplier=cfg.dp_noise_multiplier)


def secret_generator() -> torch.Generator:
    """A CPU generator seeded from the OS's entropy (never from the run's seed, which the server knows)."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def private_step(model: MILModel, bags: Sequence, criterion: torch.nn.Module, plan: DpSgdPlan, expected: float,
                 generator: torch.Generator, device: torch.device) -> None:
    """Set ``.grad`` of ``model``'s parameters to the noisy mean of the sampled bags' clipped gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    # A survival loss is called on the batch (time, event); only the discrete-time one is separable per slide, so
    # only it gets here (``check_dp_compatible``): on a batch of one bag it is that slide's own term.
    survival = isinstance(criterion, SurvivalLoss)
    if survival and criterion.kind != "discrete":
        raise ValueError(f"DP-SGD needs a loss that is a sum of per-slide terms, not the {criterion.kind!r} loss")
    for item in bags:
        batch = collate_bags([item])
        x, mask, y = batch.x.to(device), batch.mask.to(device), batch.targets.to(device)
        out = model(x, mask, labels=None if survival else y)
        loss = criterion(out.logits, batch) if survival else criterion(out.logits, y)
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads if g is not None]))
        scale = torch.clamp(plan.clipping_norm / (norm + 1e-12), max=1.0)
        for acc, g in zip(total, grads, strict=True):
            if g is not None:
                acc.add_(g * scale)
    std = plan.noise_multiplier * plan.clipping_norm
    for p, acc in zip(params, total, strict=True):
        noise = torch.normal(0.0, std, size=tuple(p.shape), generator=generator).to(device=device, dtype=p.dtype)
        p.grad = (acc + noise) / expected


def train_round(model: MILModel, dataset: Dataset, optimizer: torch.optim.Optimizer, criterion: torch.nn.Module,
                plan: DpSgdPlan, device: torch.device, *, first_epoch: int = 0, proximal_mu: float = 0.0,
                anchor: Sequence[torch.Tensor] | None = None) -> None:
    """``plan.steps_per_round`` DP-SGD steps on ``dataset`` (one round of a site's training).

    FedProx's proximal term depends on no data, so its gradient is added after the noise.
    """
    if any(True for _ in model.buffers()):
        raise ValueError(f"model {model.config.model!r} has buffers (e.g. batch-norm statistics), which DP-SGD "
                         "would release without noise")
    generator = secret_generator()
    n = len(dataset)
    expected = plan.sample_rate * n
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(plan.steps_per_round):
        set_epoch(dataset, first_epoch + step // plan.steps_per_epoch)
        chosen = torch.nonzero(torch.rand(n, generator=generator) < plan.sample_rate).flatten().tolist()
        optimizer.zero_grad(set_to_none=True)
        private_step(model, [dataset[i] for i in chosen], criterion, plan, expected, generator, device)
        if proximal_mu > 0 and anchor is not None:
            for p, a in zip(params, anchor, strict=True):
                p.grad.add_(p.detach() - a, alpha=proximal_mu)
        optimizer.step()


def steps_done(server_round: int, counted: int, plan: DpSgdPlan) -> int:
    """Steps already spent before ``server_round``: the more of the site's count and what the rounds imply.

    Taking the larger means a server that replays a round number cannot make the site spend more than planned.
    """
    return max(counted, (server_round - 1) * plan.steps_per_round)


def check_budget(done: int, plan: DpSgdPlan) -> None:
    if done + plan.steps_per_round > plan.total_steps:
        raise PrivacyBudgetError(
            f"this round would take the site past its privacy plan ({plan.total_steps} DP-SGD steps, epsilon "
            f"{plan.epsilon(plan.total_steps):.3g} at delta {plan.delta:g}; {done} steps spent)")
