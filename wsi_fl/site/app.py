"""The Flower ClientApp a hospital runs next to its data: it trains and evaluates, and sends only aggregates.

Three message types, all configured by the server's instruction (a
ConfigRecord; see :data:`CLIENT_KEYS`), never by settings held here:

* ``query``: the site's feature dimension, class labels and feature provenance
  (encoder, resolution), so the server can build the global model and refuse a
  federation that mixes feature spaces.
* ``train``: load the global weights, train ``local-epochs`` epochs on the
  site's training split (Adam by default; its moments are kept across rounds in
  the node's context state; FedProx's proximal term when ``proximal-mu`` is
  sent), return the weights, the number of training bags and the mean loss.
* ``evaluate``: the global model on the site's validation and test splits,
  returned as counts only: per-class score histograms and a confusion matrix
  (:mod:`wsi_fl.federation.histograms`), plus the mean loss and number of slides. No slide id,
  path, coordinate, per-slide score or patient id is ever in a reply. A survival run
  (``task = "survival"``, :mod:`wsi_fl.site.survival`) sends per split (train, val, test) two
  count grids, follow-up time x risk, for the patients with the event and the censored, instead.

Where the data is comes from the node config (:mod:`wsi_fl.site.data`). Every
instruction passes the site's policy first and every message is written to the
site's audit log (:mod:`wsi_fl.site.guard`, the outermost mod).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch.utils.data import Dataset

from models import MILModel, create_model
from wsi_fl._logging import configure_logging
from wsi_fl.federation import arrays as fedarrays
from wsi_fl.federation.config import CLIENT_KEYS, FedConfig
from wsi_fl.federation.histograms import confusion, score_histograms
from wsi_fl.mil.training import (
    BagCrossEntropy,
    make_criterion,
    make_loader,
    make_optimizer,
    pick_device,
    predict,
    seed_everything,
    train_epoch,
)
from wsi_fl.privacy import dpsgd
from wsi_fl.site.clipping import clipping_mod
from wsi_fl.site.data import SiteData, load_site, site_from_node_config
from wsi_fl.site.guard import SiteGuard
from wsi_fl.site.secagg import secagg_mod
from wsi_fl.site.survival import SURVIVAL_SPLITS, survival_aggregates, survival_criterion

log = logging.getLogger("wsi_fl.client")


_OPTIMIZER_STATE = "wsi-fl.optimizer"
_DPSGD_STATE = "wsi-fl.dpsgd"  # DP-SGD steps this site has taken in this run


def settings_from(config: ConfigRecord) -> tuple[FedConfig, tuple[str, ...] | None, int]:
    """(settings, federation's classes or None, server round) from an instruction's config."""
    cfg = FedConfig.from_run_config({k: config[k] for k in CLIENT_KEYS if k in config})
    classes = tuple(config["classes"]) if "classes" in config else None
    return cfg, classes, int(config.get("server-round", 0))


def site_data(context: Context, cfg: FedConfig, classes: tuple[str, ...] | None,
              cohort: str | Path | None) -> SiteData:
    site = site_from_node_config(context.node_config, cohort)
    survival = (cfg.time_col, cfg.event_col) if cfg.task == "survival" else None
    if survival is not None:  # the head's outputs, which the run config fixes
        classes = tuple(cfg.outputs(()))
    return load_site(site, classes=classes, label_col=cfg.label_col, val_frac=cfg.val_frac,
                     test_frac=cfg.test_frac, seed=cfg.seed, max_instances=cfg.max_instances or None,
                     survival=survival)


def save_optimizer_state(optimizer: torch.optim.Optimizer, context: Context) -> None:
    arrays = {f"{idx}.{name}": value.detach().cpu().reshape(value.shape)
              for idx, state in optimizer.state_dict()["state"].items() for name, value in state.items()
              if torch.is_tensor(value)}
    context.state[_OPTIMIZER_STATE] = ArrayRecord(arrays)


def restore_optimizer_state(optimizer: torch.optim.Optimizer, context: Context) -> bool:
    """Load the moments saved last round if they fit this model; False (fresh moments) otherwise."""
    if _OPTIMIZER_STATE not in context.state:
        return False
    saved = fedarrays.to_state_dict(context.state[_OPTIMIZER_STATE])
    template = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in saved.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    fits = len(state) == len(params) and all(
        i in state and "exp_avg" in state[i] and state[i]["exp_avg"].shape == p.shape for i, p in enumerate(params))
    if not fits:
        log.warning("optimizer state from an earlier round does not fit the model; starting fresh moments")
        return False
    optimizer.load_state_dict({"state": state, "param_groups": template["param_groups"]})
    return True


def train(msg: Message, context: Context, cohort: str | Path | None = None) -> Message:
    cfg, classes, server_round = settings_from(msg.content["config"])
    data = site_data(context, cfg, classes, cohort)
    seed_everything(cfg.seed + 7919 * server_round)  # dropout and shuffling differ per round, reproducibly
    device = pick_device("auto")
    model = create_model(cfg.mil_config(data.feature_dim, len(data.classes)))
    model.load_state_dict(fedarrays.to_state_dict(msg.content["arrays"]))
    model.to(device)
    train_cfg = cfg.train_config()
    optimizer = make_optimizer(model, train_cfg)
    restore_optimizer_state(optimizer, context)
    mu = float(msg.content["config"].get("proximal-mu", 0.0))
    anchor = [p.detach().clone() for p in model.parameters()] if mu > 0 else None
    first_epoch = (server_round - 1) * cfg.local_epochs
    if cfg.dp == "slide-dpsgd":
        metrics = MetricRecord({"num-examples": len(data.train),
                                "dp-epsilon": train_private(model, data, optimizer, cfg, server_round, context, device,
                                                            first_epoch=first_epoch, proximal_mu=mu, anchor=anchor)})
    else:
        criterion = (survival_criterion(cfg) if cfg.task == "survival"
                     else make_criterion(data.train, len(data.classes), train_cfg, device))
        loader = make_loader(data.train, replace(train_cfg, seed=cfg.seed + server_round))
        losses = [train_epoch(model, loader, optimizer, criterion, device, epoch=first_epoch + e, proximal_mu=mu,
                              anchor=anchor) for e in range(cfg.local_epochs)]
        metrics = MetricRecord({"num-examples": len(data.train), "train-loss": float(np.mean(losses))})
    save_optimizer_state(optimizer, context)
    content = RecordDict({"arrays": fedarrays.to_record(model.state_dict(), cfg.transport), "metrics": metrics})
    return Message(content=content, reply_to=msg)


def train_private(model: MILModel, data: SiteData, optimizer: torch.optim.Optimizer, cfg: FedConfig, server_round: int,
                  context: Context, device: torch.device, **kwargs: Any) -> float:
    """One round of slide-level DP-SGD (:mod:`wsi_fl.privacy.dpsgd`) within the site's plan; returns the ε spent so far.

    The loss is unweighted (class weights would depend on every bag's label) and is not reported.
    """
    plan = dpsgd.plan_for(len(data.train), cfg)
    counted = int(context.state[_DPSGD_STATE]["steps"]) if _DPSGD_STATE in context.state else 0
    done = dpsgd.steps_done(server_round, counted, plan)
    dpsgd.check_budget(done, plan)
    criterion = survival_criterion(cfg) if cfg.task == "survival" else BagCrossEntropy()
    dpsgd.train_round(model, data.train, optimizer, criterion, plan, device, **kwargs)
    context.state[_DPSGD_STATE] = ConfigRecord({"steps": done + plan.steps_per_round})
    spent = plan.epsilon(done + plan.steps_per_round)
    log.info("round %d: slide-level DP-SGD, %d steps (noise multiplier %.3g, sampling rate %.3g, clipping norm %g); "
             "epsilon spent %.3g of %.3g at delta %g", server_round, plan.steps_per_round, plan.noise_multiplier,
             plan.sample_rate, plan.clipping_norm, spent, plan.epsilon(plan.total_steps), plan.delta)
    return spent


def split_aggregates(model: MILModel, ds: Dataset | None, prefix: str, n_classes: int, bins: int,
                     device: torch.device) -> dict[str, int | float | list[int]]:
    """Counts and the summed loss of one split: what :mod:`wsi_fl.federation.histograms` needs, nothing per slide."""
    hist_shape = (1 if n_classes == 2 else n_classes) * 2 * bins
    if ds is None or len(ds) == 0:
        return {f"{prefix}-n": 0, f"{prefix}-loss-sum": 0.0, f"{prefix}-hist": [0] * hist_shape,
                f"{prefix}-confusion": [0] * n_classes**2}
    preds = predict(model, ds, device=device)
    probs = np.clip(preds.probs, 1e-12, 1.0)
    nll = -np.log(probs[np.arange(len(preds.targets)), preds.targets])
    return {f"{prefix}-n": len(preds.targets), f"{prefix}-loss-sum": float(nll.sum()),
            f"{prefix}-hist": score_histograms(preds.targets, preds.probs, bins).ravel().tolist(),
            f"{prefix}-confusion": confusion(preds.targets, preds.probs).ravel().tolist()}


def evaluate(msg: Message, context: Context, cohort: str | Path | None = None) -> Message:
    cfg, classes, _ = settings_from(msg.content["config"])
    data = site_data(context, cfg, classes, cohort)
    device = pick_device("auto")
    model = create_model(cfg.mil_config(data.feature_dim, len(data.classes)))
    model.load_state_dict(fedarrays.to_state_dict(msg.content["arrays"]))
    model.to(device).eval()
    metrics: dict = {}
    if cfg.task == "survival":
        for prefix in SURVIVAL_SPLITS:
            metrics.update(survival_aggregates(model, getattr(data, prefix), prefix, cfg, device))
    else:
        for prefix, ds in (("val", data.val), ("test", data.test)):
            metrics.update(split_aggregates(model, ds, prefix, len(data.classes), cfg.auc_bins, device))
    metrics["num-examples"] = max(metrics["val-n"] + metrics["test-n"], 1)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def query(msg: Message, context: Context, cohort: str | Path | None = None) -> Message:
    import json

    cfg, _, _ = settings_from(msg.content["config"])
    data = site_data(context, cfg, None, cohort)
    info = ConfigRecord({"feature-dim": data.feature_dim, "classes": list(data.classes),
                         "provenance": json.dumps(data.provenance, sort_keys=True),
                         "n-train": len(data.train)})
    return Message(content=RecordDict({"info": info}), reply_to=msg)


def train_bags(config: ConfigRecord, context: Context, cohort: str | Path | None = None) -> int:
    """The site's training bags under these settings' split (what ``min-train-bags`` is checked against)."""
    cfg, classes, _ = settings_from(config)
    return len(site_data(context, cfg, classes, cohort).train)


def make_client_app(cohort: str | Path | None = None) -> ClientApp:
    """A ClientApp; ``cohort`` maps simulation partition ids to sites (deployment uses the node config)."""
    # In deployment nothing else sets up logging in the ClientApp's process: without this the site's own lines
    # (its policy, a refusal) would be lost, and warnings printed with no level or source.
    configure_logging()
    guard = SiteGuard(cohort, lambda config, context: train_bags(config, context, cohort))  # policy in, audit out
    # The guard sees every message first and every reply last (what leaves, masked under SecAgg+); secagg_mod
    # answers SecAgg+'s stages and hands its fit stage to `train`; clipping_mod clips the update under client DP.
    app = ClientApp(mods=[guard, secagg_mod, clipping_mod])
    app.train()(lambda msg, context: train(msg, context, cohort))
    app.evaluate()(lambda msg, context: evaluate(msg, context, cohort))
    app.query()(lambda msg, context: query(msg, context, cohort))
    return app


app = make_client_app()
