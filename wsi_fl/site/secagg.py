"""The site's side of SecAgg+ (:mod:`wsi_fl.server.secagg`): Flower's ``secaggplus_mod`` in front of our ``train``.

SecAggPlusWorkflow speaks the legacy FitIns/FitRes content (unnamed arrays, a
flat config) in four TRAIN messages; our ClientApp's ``train`` speaks the
Message API (``arrays`` + ``config`` in, ``arrays`` + ``metrics`` out).
:func:`secagg_mod` runs Flower's mod on the workflow's messages and translates
its one fit call both ways; every other message passes through untouched, so
the mod can always be installed and the server chooses the path per run.
The site never imports the server: the message keys both sides use live in
:mod:`wsi_fl.federation.config`.
"""

from __future__ import annotations

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from wsi_fl.federation import arrays as fedarrays
from wsi_fl.federation.config import SECAGG_KEY_CLIP, SECAGG_KEY_MAX_WEIGHT, SECAGG_KEY_NAMES

#: Keys the server adds to the instruction for this adapter (``train`` never sees them).
KEY_NAMES, KEY_CLIP, KEY_MAX_WEIGHT = SECAGG_KEY_NAMES, SECAGG_KEY_CLIP, SECAGG_KEY_MAX_WEIGHT


def is_secagg_message(msg: Message) -> bool:
    """A message of SecAggPlusWorkflow (any of its four stages), as opposed to our plain ``train``."""
    return (msg.metadata.message_type == MessageType.TRAIN and msg.has_content()
            and RECORD_KEY_CONFIGS in msg.content.config_records)


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for SecAgg+ messages, with our ``train`` as its fit; others pass through.

    Installed always, it costs nothing on the plain path: the server decides per run which path a site takes.
    """
    if not is_secagg_message(msg):
        return call_next(msg, context)
    return secaggplus_mod(msg, context, lambda inner, ctx: _train_as_fit(inner, ctx, call_next))


def _train_as_fit(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The masked-upload stage: FitIns content -> our train message -> its reply -> FitRes content to be masked."""
    config = msg.content.config_records["fitins.config"]
    names = list(config[KEY_NAMES])
    params = msg.content.array_records["fitins.parameters"]
    arrays = ArrayRecord({name: Array(bytes_to_ndarray(params[str(i)].data)) for i, name in enumerate(names)})
    plain = ConfigRecord({k: v for k, v in config.items() if k not in (KEY_NAMES, KEY_CLIP, KEY_MAX_WEIGHT)})
    msg.content = RecordDict({"arrays": arrays, "config": plain})
    reply = call_next(msg, context)
    if reply.has_error():
        raise RuntimeError(f"training failed: {reply.error.reason}")
    update = fedarrays.to_numpy(reply.content["arrays"])
    metrics = reply.content["metrics"]
    n, limit, max_weight = int(metrics["num-examples"]), float(config[KEY_CLIP]), float(config[KEY_MAX_WEIGHT])
    largest = max(float(np.abs(a).max(initial=0.0)) for a in update.values())
    if n > max_weight or not largest <= limit:  # SecAgg+ would clip silently and corrupt the mean
        raise ValueError(f"update out of SecAgg+ range: {n} training bags (max weight {max_weight:g}), largest "
                         f"|weight| {largest:.3g} (secagg-clipping-range {limit:g})")
    fitres = FitRes(Status(Code.OK, "OK"), ndarrays_to_parameters([update[k] for k in names]), n,
                    {"train-loss": float(metrics["train-loss"])})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
