"""A hospital's own rules for what its ClientApp will do, whatever the server asks.

The server sends every instruction with its settings (a ConfigRecord, see
:data:`wsi_fl.site.app.CLIENT_KEYS`); a site that trusted them blindly would
train any model, for any number of rounds, with or without differential
privacy, and report its evaluation to any SuperLink. A site policy is a small
TOML file the hospital keeps next to its SuperNode (node config key
``policy``); the ClientApp checks every instruction against it and refuses
(an error reply whose reason the server logs) what lies outside. Keys are
hyphenated, as in the run config::

    allowed-models = ["gated_attention", "attention"]
    allowed-strategies = ["fedavg", "fedprox"]
    min-train-bags = 10
    max-rounds = 200
    require-dp = true
    min-noise-multiplier = 0.8
    allow-site-metrics = true
    allow-survival-histograms = false
    min-eval-slides = 10
    superlink = ["fl.example-consortium.org:8000"]

A key left out takes the default below; an unknown key or a wrong type is a
one-line error naming the file and the key, and the site then refuses every
instruction (fail closed) until the file is fixed.

**The defaults are the safe choice** (:class:`SitePolicy`'s field docs say why
each is what it is): any registered model and strategy (the code cannot run
others anyway), at most 500 rounds, at least 10 training bags, DP not
required, **no per-site evaluation metrics** (opt in with
``allow-site-metrics = true``), splits of fewer than 10 slides never
reported, any SuperLink. A node without a ``policy`` runs under these
defaults, logged once. Simulated sites (partitions of a cohort given to
:func:`wsi_fl.site.app.make_client_app` in this process, whose data the
person running the server already holds) run under :func:`rehearsal_policy`
instead: the same rules without the thresholds that tiny synthetic sites
cannot meet. ``docs/site-policy.md`` has the full story.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, get_args

import tomllib
from flwr.common import MessageType

from models import list_models
from wsi_fl.errors import ConfigError
from wsi_fl.federation.config import FedConfig, StrategyName

log = logging.getLogger("wsi_fl.site.policy")

#: How a policy names an app release: the sha256 of its Flower App Bundle (:mod:`wsi_fl.site.approval`).
APP_HASH = re.compile(r"sha256:[0-9a-f]{64}")
#: The message types a site answers (Flower also allows "<type>.<action>"; the action does not matter here).
ANSWERED = (MessageType.QUERY, MessageType.TRAIN, MessageType.EVALUATE)


class PolicyError(ConfigError):
    """A policy file that cannot be read or holds an unknown key or a wrong type (one line, names file and key)."""


class PolicyViolation(Exception):
    """An instruction the site's policy refuses; ``str(err)`` is the one-line reason sent to the server."""


def _registered_models() -> tuple[str, ...]:
    return tuple(list_models())


def _registered_strategies() -> tuple[str, ...]:
    return tuple(sorted(get_args(StrategyName)))  # the registry's names (a test keeps them equal), no server code


@dataclass(frozen=True)
class SitePolicy:
    allowed_models: tuple[str, ...] = field(default_factory=_registered_models, metadata={
        "help": "MIL models this site trains and evaluates (default: every registered one)"})
    allowed_strategies: tuple[str, ...] = field(default_factory=_registered_strategies, metadata={
        "help": "aggregation strategies this site takes part in (default: every registered one)"})
    min_train_bags: int = field(default=10, metadata={
        "help": "fewest training bags (slides) with which this site trains. An update computed from a handful of "
                "slides is close to a function of those few patients: gradient inversion and membership "
                "inference get easier as the batch shrinks, and one round of one local epoch over 3 bags is "
                "3 optimiser steps on single slides. 10 is the usual small-cell threshold of statistical "
                "disclosure control (e.g. suppressing counts under 10); below it the site still evaluates"})
    max_rounds: int = field(default=500, metadata={
        "help": "largest num-server-rounds (and server-round) this site works for: every round is another "
                "release of a function of its data and costs its compute; 500 is far above what a MIL model "
                "of a few hospitals needs (tens of rounds) yet stops a runaway or probing server"})
    require_dp: bool = field(default=False, metadata={
        "help": "train only under differential privacy (dp other than 'none'). Off by default: with a few "
                "hospitals DP costs much accuracy (see wsi_fl.privacy.central), so it is a consortium's decision"})
    min_noise_multiplier: float = field(default=0.0, metadata={
        "help": "least noise multiplier a run under DP must use (needs require-dp = true)"})
    allow_site_metrics: bool = field(default=False, metadata={
        "help": "answer evaluate instructions. Off by default: an evaluation reply is this site's score "
                "histograms and confusion counts, from which the server can compute this site's own AUC and "
                "accuracy, and nothing in this project aggregates evaluations securely. Training works "
                "without it; the federation then has no validation or test metric from this site"})
    allow_survival_histograms: bool = field(default=False, metadata={
        "help": "answer the evaluate instructions of survival runs (task = 'survival'; also needs "
                "allow-site-metrics). Off by default: such a reply is two count grids per split, follow-up time x "
                "predicted risk, for the patients with the event and the censored: from them the server can "
                "compute this site's own C-index and, to the width of a time bin, how long its patients were "
                "followed and when they had their events, which a classification histogram does not reveal"})
    min_eval_slides: int = field(default=10, metadata={
        "help": "small-cell suppression: a split with fewer slides than this is reported as empty (zero counts), "
                "since a score histogram of a few slides is close to their individual scores"})
    superlink: tuple[str, ...] = field(default=(), metadata={
        "help": "SuperLink addresses (host:port, as in the node config's superlink) this site may serve; "
                "empty: any"})
    approved_apps: tuple[str, ...] = field(default=(), metadata={
        "help": "app releases this site runs: sha256:<hex> of the Flower App Bundle (wsi-fl app-hash DIR prints "
                "it from a reviewed source tree). Checked by the site's own task runner (wsi-fl site-runner) "
                "before any code of a run's bundle could run, on the bundle's content, never its name; empty: "
                "none, the runner refuses every run. docs/threat-model.md says why"})
    require_secagg: bool = field(default=False, metadata={
        "help": "train only under SecAgg+ (secagg = true), so that the server sees only the sum of the sites' "
                "updates, never this site's own"})
    lifetime_epsilon: float = field(default=0.0, metadata={
        "help": "lifetime privacy budget of each dataset under slide-level DP: the site's privacy ledger "
                "(wsi_fl.site.ledger) adds up the planned epsilon of every run it admitted on a dataset, and a run "
                "that would take the sum past this is refused before it trains; with a budget, only runs under "
                "dp = 'slide-dpsgd' train. 0: no limit (the ledger still records every such run)"})

    def __post_init__(self) -> None:
        for name in ("min_train_bags", "max_rounds", "min_eval_slides"):
            if getattr(self, name) < 1:
                raise ValueError(f"{_key(name)} must be >= 1, not {getattr(self, name)}")
        if self.min_noise_multiplier < 0:
            raise ValueError(f"min-noise-multiplier must be >= 0, not {self.min_noise_multiplier}")
        if not 0 <= self.lifetime_epsilon < math.inf:
            raise ValueError(f"lifetime-epsilon must be a finite number >= 0, not {self.lifetime_epsilon}")
        if self.min_noise_multiplier > 0 and not self.require_dp:
            raise ValueError("min-noise-multiplier > 0 needs require-dp = true (it only applies to runs under DP)")
        bad = [h for h in self.approved_apps if not APP_HASH.fullmatch(h)]
        if bad:
            raise ValueError(f"approved-apps: {bad[0]!r} is not sha256:<64 lower-case hex> "
                             "(wsi-fl app-hash prints one)")
        for name, known in (("allowed_models", _registered_models()), ("allowed_strategies", _registered_strategies())):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"{_key(name)} must name at least one (a site that takes no part runs no SuperNode)")
            unknown = [v for v in values if v not in known]
            if unknown:
                raise ValueError(f"{_key(name)}: {unknown[0]!r} is not registered ({', '.join(known)})")

    def to_dict(self) -> dict[str, Any]:
        """The policy as a policy file holds it (hyphenated keys, lists), e.g. for ``tomli_w.dumps``."""
        return {_key(f.name): list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}

    def allows_superlink(self, address: str) -> bool:
        return not self.superlink or address in self.superlink

    def describe(self) -> str:
        """One line for the site's log."""
        shown = {f.name: _show(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if not self.approved_apps:
            shown["approved_apps"] = "[] (none: a site-runner refuses every app)"
        if not self.lifetime_epsilon:
            shown["lifetime_epsilon"] = "0 (no limit)"
        return "; ".join(f"{_key(name)} = {value}" for name, value in shown.items())


def rehearsal_policy() -> SitePolicy:
    """The policy of simulated sites and loopback rehearsals: the defaults without the size thresholds.

    Synthetic and demo sites have a handful of slides, which the default thresholds would refuse to train on or
    to report; their data are synthetic or already held by whoever runs the server, so there is no patient to
    protect. Evaluation is allowed so that the rehearsal shows the federated metrics.
    """
    return SitePolicy(min_train_bags=1, min_eval_slides=1, allow_site_metrics=True, allow_survival_histograms=True)


def load_policy(path: str | Path) -> SitePolicy:
    """The policy in a TOML file; :class:`PolicyError` (naming the file and the key) if it is not one."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as err:
        raise PolicyError(f"{path}: cannot read the site policy ({err.strerror or err})") from None
    except tomllib.TOMLDecodeError as err:
        raise PolicyError(f"{path}: not valid TOML ({err})") from None
    fields = {f.name: f for f in dataclasses.fields(SitePolicy)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in fields or "_" in key:
            raise PolicyError(f"{path}: unknown key {key!r} (known: {', '.join(_key(n) for n in fields)})")
        values[name] = _coerce(path, key, value, fields[name].type)
    try:
        return SitePolicy(**values)
    except ValueError as err:
        raise PolicyError(f"{path}: {err}") from None


def _coerce(path: Path, key: str, value: Any, type_name: Any) -> Any:
    """``value`` as the field's type, or :class:`PolicyError` naming ``key``."""
    if type_name == "bool" and isinstance(value, bool):
        return value
    if type_name == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if type_name == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if type_name == "tuple[str, ...]":
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list) and all(isinstance(v, str) and v for v in items):
            return tuple(items)
        type_name = "a list of non-empty strings"
    raise PolicyError(f"{path}: {key} must be {type_name}, not {value!r}")


@dataclass(frozen=True)
class SiteFacts:
    """What the site knows about itself that a rule needs (None: not known for this message type)."""

    train_bags: int | None = None
    superlink: str | None = None  # the address its SuperNode was started with (node config ``superlink``)


def check_instruction(policy: SitePolicy, message_type: str, config: Mapping[str, Any] | None,
                      facts: SiteFacts) -> None:
    """Raise :class:`PolicyViolation` with a one-line reason if ``policy`` refuses this instruction.

    ``config`` is the instruction's ConfigRecord; a setting it lacks is checked at the value the site would use
    (:class:`~wsi_fl.federation.config.FedConfig`'s default), so leaving a key out is no way around a rule. None: a
    message that carries no settings (a SecAgg+ protocol stage), for which only the message type and the
    SuperLink are checked.
    """
    kind = message_type.split(".", 1)[0]
    if kind not in ANSWERED:
        _refuse(f"message type {message_type!r} is not one this site answers ({', '.join(ANSWERED)})")
    if policy.superlink:
        if not facts.superlink:
            _refuse("the node config does not name the SuperLink (set superlink) and the policy allows only "
                    f"{', '.join(policy.superlink)}")
        if not policy.allows_superlink(facts.superlink):
            _refuse(f"SuperLink {facts.superlink} is not allowed (superlink: {', '.join(policy.superlink)})")
    if config is None:
        return
    settings = {**FedConfig().to_run_config(), **dict(config)}
    if settings["model"] not in policy.allowed_models:
        _refuse(f"model {settings['model']!r} is not allowed (allowed-models: {', '.join(policy.allowed_models)})")
    if settings["strategy"] not in policy.allowed_strategies:
        _refuse(f"strategy {settings['strategy']!r} is not allowed "
                f"(allowed-strategies: {', '.join(policy.allowed_strategies)})")
    for key in ("num-server-rounds", "server-round"):
        if key in settings and _number(settings[key]) > policy.max_rounds:
            _refuse(f"{key} {settings[key]} exceeds max-rounds {policy.max_rounds}")
    if policy.require_secagg and not settings["secagg"]:
        _refuse("the run does not use SecAgg+ (secagg = false) and the policy sets require-secagg")
    if policy.require_dp:
        if settings["dp"] == "none":
            _refuse("the run is not differentially private (dp = 'none') and the policy sets require-dp")
        noise = noise_in_force(settings, facts.train_bags)
        if noise is not None and noise < policy.min_noise_multiplier:
            _refuse(f"dp-noise-multiplier {noise:.4g} is below min-noise-multiplier {policy.min_noise_multiplier}"
                    + (" (the noise this site's DP-SGD would use)" if settings["dp"] == "slide-dpsgd" else ""))
    if kind == MessageType.TRAIN and facts.train_bags is not None and facts.train_bags < policy.min_train_bags:
        _refuse(f"this site has {facts.train_bags} training bags, fewer than min-train-bags {policy.min_train_bags}")
    if kind == MessageType.EVALUATE and not policy.allow_site_metrics:
        _refuse("allow-site-metrics is false: this site does not report evaluation metrics")
    if kind == MessageType.EVALUATE and settings["task"] == "survival" and not policy.allow_survival_histograms:
        _refuse("allow-survival-histograms is false: this site does not report survival histograms "
                "(follow-up time x risk counts)")


def noise_in_force(settings: Mapping[str, Any], train_bags: int | None) -> float | None:
    """The noise multiplier a run's settings give; None where it is not known yet.

    Under central DP the server sends it. Under slide-dpsgd with a target ε each site calibrates its own, which
    depends on its number of training bags: known once a training instruction has them counted.
    """
    if settings["dp"] != "slide-dpsgd" or not _number(settings["dp-epsilon"]) > 0:
        return _number(settings["dp-noise-multiplier"])
    if train_bags is None or train_bags < 1:
        return None
    from wsi_fl.privacy.dpsgd import (
        plan_for,  # the site's own calibration, from the same settings its training will parse
    )

    run_keys = FedConfig().to_run_config()
    return plan_for(train_bags, FedConfig.from_run_config({k: v for k, v in settings.items() if k in run_keys})
                    ).noise_multiplier


def suppress_small_splits(metrics: Mapping[str, Any], min_slides: int) -> tuple[dict[str, Any], list[str]]:
    """An evaluation reply's metrics with every split of fewer than ``min_slides`` slides emptied; those splits.

    An emptied split looks like one without slides (:func:`wsi_fl.site.app.split_aggregates`,
    :func:`wsi_fl.site.survival.empty_split`: zero counts and loss), so the server's sums stay well-formed and
    simply do not include it. Every value of the split is emptied, whatever the task: its counts (score or
    survival histograms, confusion matrix, events) and its loss.
    """
    out, suppressed = dict(metrics), []
    for split in ("train", "val", "test"):
        n = out.get(f"{split}-n", 0)
        if 0 < n < min_slides:
            suppressed.append(split)
            for key in [k for k in out if k.startswith(f"{split}-")]:
                value = out[key]
                out[key] = [0] * len(value) if isinstance(value, list) else 0.0 if isinstance(value, float) else 0
    if suppressed and "num-examples" in out:
        out["num-examples"] = max(out.get("val-n", 0) + out.get("test-n", 0), 1)
    return out, suppressed


def _refuse(reason: str) -> NoReturn:
    raise PolicyViolation(f"site policy: {reason}")


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        _refuse(f"{value!r} is not a number")


def _key(name: str) -> str:
    return name.replace("_", "-")


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(value) + "]" if value else "[] (any)"
    return str(value).lower() if isinstance(value, bool) else str(value)
