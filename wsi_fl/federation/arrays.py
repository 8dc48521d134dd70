"""Model weights on the wire: torch state dicts to Flower ArrayRecords and back, and checks on what comes in.

Everything a site sends is checked before it can reach an aggregate: a reply
whose arrays have other names, shapes or dtypes than the global model's, or
hold NaN/Inf, is rejected with a logged reason. One poisoned or broken update
would otherwise corrupt the global model for every hospital.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord

TRANSPORT_DTYPES = {"float32": np.float32, "float16": np.float16}


def to_record(state: Mapping[str, torch.Tensor], transport: str = "float32") -> ArrayRecord:
    """Floating-point tensors travel in the ``transport`` dtype; integer buffers as they are."""
    dtype = TRANSPORT_DTYPES[transport]
    arrays = {}
    for name, tensor in state.items():
        arr = tensor.detach().cpu().numpy()
        if np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(dtype, copy=False)
        arrays[name] = Array(np.ascontiguousarray(arr))
    return ArrayRecord(arrays)


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Arrays as float32 (integer buffers kept), ready to load or aggregate."""
    out = {}
    for name, arr in record.items():
        a = arr.numpy()
        out[name] = a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a
    return out


def to_state_dict(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v)) for k, v in to_numpy(record).items()}


def record_nbytes(record: ArrayRecord) -> int:
    """Payload bytes of the arrays (what dominates a message; the .npy headers are counted too)."""
    return sum(len(arr.data) for arr in record.values())


def check_update(record: ArrayRecord, reference: ArrayRecord, transport: str) -> str | None:
    """Why ``record`` (a site's update) must not be aggregated, or ``None`` if it may.

    ``reference`` is the global model sent this round: the update must have the
    same array names and shapes, floating arrays in the ``transport`` dtype (or
    float32), and only finite values.
    """
    allowed = {np.dtype(TRANSPORT_DTYPES[transport]), np.dtype(np.float32)}
    missing = sorted(set(reference.keys()) - set(record.keys()))
    extra = sorted(set(record.keys()) - set(reference.keys()))
    if missing or extra:
        return f"array names differ from the global model (missing: {missing[:3]}, unexpected: {extra[:3]})"
    for name, ref in reference.items():
        arr = record[name]
        if tuple(arr.shape) != tuple(ref.shape):
            return f"array {name!r} has shape {tuple(arr.shape)}, expected {tuple(ref.shape)}"
        try:
            values = arr.numpy()
        except Exception as err:  # a malformed buffer is a rejection, not a server crash
            return f"array {name!r} cannot be decoded ({type(err).__name__}: {err})"
        ref_dtype = np.dtype(ref.dtype)
        if np.issubdtype(ref_dtype, np.floating):
            if values.dtype not in allowed:
                return f"array {name!r} has dtype {values.dtype}, expected one of {sorted(map(str, allowed))}"
            if not np.isfinite(values).all():
                return f"array {name!r} holds NaN or Inf"
        elif values.dtype != ref_dtype:
            return f"array {name!r} has dtype {values.dtype}, expected {ref_dtype}"
    return None


def check_weight(value: object) -> str | None:
    """The aggregation weight (number of training bags) must be a positive finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return f"num-examples must be a positive number, not {value!r}"
    return None


def reply_metrics(reply: Message) -> MetricRecord:
    """A screened training reply's one MetricRecord (the server's ``screen_replies`` checks there is exactly one)."""
    return next(iter(reply.content.metric_records.values()))
