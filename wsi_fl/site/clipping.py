"""The site's clipping mod for the client-side central DP modes (``client-fixed``, ``client-adaptive``).

In those modes the site clips its own update before it leaves, and the server adds the noise
(:mod:`wsi_fl.privacy.central`); so the mod belongs to the site, beside its other mods.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import MessageType
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM


def clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A site clips its own update when the server asks (``client-*`` DP modes); other messages pass through.

    Flower's clipping mods answer every message without a clipping norm with an
    error, so they cannot sit in the ClientApp's mods unconditionally.
    """
    if msg.metadata.message_type != MessageType.TRAIN or "config" not in msg.content.config_records:
        return call_next(msg, context)
    config = msg.content["config"]
    if KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    mod: Callable[[Message, Context, ClientAppCallable], Message] = (
        adaptiveclipping_mod if str(config.get("dp", "")).endswith("adaptive") else fixedclipping_mod)
    return mod(msg, context, call_next)
