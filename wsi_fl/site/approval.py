"""Which app releases a site runs: the hash of a Flower App Bundle, computed from its bytes, against the policy.

A Flower App Bundle (FAB) is what ``flwr run <dir>`` ships to every
SuperNode: a zip of the app directory that Flower builds deterministically
(files sorted, fixed timestamps, ``pyproject.toml`` normalised), so the same
source tree always gives the same bytes, and its sha256 names a release. A
hospital that reviewed a release computes that name with ``wsi-fl app-hash
DIR`` (:func:`app_hash`, Flower's own builder, the bytes ``flwr run`` sends)
and lists it under ``approved-apps`` in its site policy; the site's task
runner (:mod:`wsi_fl.site.runner`) checks every task's bundle against that
list (:func:`check_app`) before anything else happens.

The hash is always computed here from the bundle's content: the hash string
that travels with a bundle (Flower's ``Fab.hash_str``) is the sender's claim,
and a name or a directory it was once unpacked to proves nothing.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from wsi_fl.errors import ConfigError

PREFIX = "sha256:"


class AppRefused(Exception):
    """A bundle the site's policy does not approve; ``str(err)`` is the one-line reason sent to the server."""

    def __init__(self, reason: str, app: str) -> None:
        super().__init__(reason)
        self.app = app


class AppDirError(ConfigError):
    """A directory Flower cannot build an app bundle from (one line)."""


def bundle_hash(content: bytes) -> str:
    """``sha256:<hex>`` of a bundle's bytes."""
    return PREFIX + hashlib.sha256(content).hexdigest()


def build_bundle(directory: str | Path) -> bytes:
    """The bundle ``flwr run DIR`` / ``flwr build`` would send, built by Flower's own function (so the bytes match)."""
    from flwr.cli.build import build_fab_from_disk

    path = Path(directory)
    if not (path / "pyproject.toml").is_file():
        raise AppDirError(f"{path}: no pyproject.toml, not a Flower app directory")
    try:
        return build_fab_from_disk(path)
    except (ValueError, OSError) as err:  # Flower's messages are several lines (one per problem)
        raise AppDirError(f"{path}: Flower cannot build an app bundle ({' '.join(str(err).split())})") from None
    except Exception as err:  # AppPathDepthError and click exceptions: still the user's directory to fix
        raise AppDirError(f"{path}: Flower cannot build an app bundle ({type(err).__name__}: "
                          f"{' '.join(str(err).split())})") from None


def app_hash(directory: str | Path) -> str:
    """``sha256:<hex>`` of the bundle built from ``directory``: what a site lists under ``approved-apps``."""
    return bundle_hash(build_bundle(directory))


def refusal_reason(site: str, app: str) -> str:
    """The one line a refused run's coordinator reads (12 hex digits name the release well enough to look it up)."""
    return f"site {site} refused app {app[:len(PREFIX) + 12]}…: not an approved release (policy approved-apps)"


def check_app(approved: tuple[str, ...], content: bytes, site: str) -> str:
    """The bundle's ``sha256:`` hash if ``approved`` lists it; :class:`AppRefused` otherwise."""
    app = bundle_hash(content)
    if app not in approved:
        raise AppRefused(refusal_reason(site, app), app)
    return app
