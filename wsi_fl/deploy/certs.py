"""TLS certificates and SuperNode authentication keys for a Flower federation, written with ``cryptography``.

* :func:`write_tls_certificates`: a CA (key and self-signed certificate) and a server certificate it signs,
  with subjectAltNames for the SuperLink's hostnames and IP addresses. The SuperLink takes
  ``--ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key``; SuperNodes
  (``--root-certificates``) and ``flwr`` (``root-certificates`` in ``$FLWR_HOME/config.toml``) take ``ca.crt``.
* :func:`write_site_key`: one site's own key pair, made at the site without any CA (its private key never
  leaves it), in the formats of :func:`write_supernode_keys`.
* :func:`write_supernode_keys`: one EC (P-384) key pair per SuperNode in the formats Flower 1.41 reads: the
  private key in OpenSSH format (``flower-supernode --auth-supernode-private-key``, read with
  ``load_ssh_private_key``), the public key as an OpenSSH line (``flwr supernode register KEY.pub``, read with
  ``load_ssh_public_key``; the same as ``ssh-keygen -t ecdsa -b 384``).

Private keys are written with mode 0600. Every file is generated in memory first and then written under a
temporary name in its directory and renamed into place, so a file is either complete or absent. These are
certificates for a rehearsal or a small federation; a hospital network should use its own PKI.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_KEY_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class TlsFiles:
    """Where :func:`write_tls_certificates` wrote the CA and the server certificate."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeyPair:
    """One SuperNode's authentication keys: OpenSSH private key (0600) and OpenSSH public key line."""

    private_key: Path
    public_key: Path


def parse_hosts(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """subjectAltNames for ``hosts``: IP addresses as IP entries, everything else as DNS names (checked)."""
    if isinstance(hosts, str) or not hosts:
        raise ValueError("hosts: give at least one hostname or IP address (as a list)")
    names: list[x509.GeneralName] = []
    for host in hosts:
        if not isinstance(host, str):
            raise ValueError(f"hosts: {host!r} is not a string")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        labels = host.rstrip(".").split(".")
        if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
            raise ValueError(f"hosts: {host!r} is neither an IP address nor a valid hostname")
        if labels[-1].isdigit():  # e.g. 127.0.0.300: no hostname ends in a number
            raise ValueError(f"hosts: {host!r} is not a valid IP address")
        names.append(x509.DNSName(host.rstrip(".").lower()))
    return list(dict.fromkeys(names))  # duplicates once, order kept


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory")
    if not overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} already exists and is not empty (overwrite, or --overwrite, replaces its files)")


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode``: under a temporary name in the same directory, then renamed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_tls_certificates(out_dir: str | Path, hosts: Sequence[str], *, days: int = 365,
                           overwrite: bool = False, common_name: str = "wsi-fl federation CA") -> TlsFiles:
    """Write ``ca.crt``/``ca.key`` and ``server.pem``/``server.key`` (signed by the CA, SANs = ``hosts``).

    ``hosts`` are the names and addresses SuperNodes and ``flwr`` use to reach the SuperLink (e.g.
    ``["localhost", "127.0.0.1"]``); the first is also the server certificate's common name. ``out_dir`` is
    created; an existing non-empty one is refused unless ``overwrite``. Raises :class:`ValueError` for a bad host,
    ``days`` < 1 or an existing ``out_dir``.
    """
    sans = parse_hosts(hosts)
    if days < 1:
        raise ValueError(f"days: {days} (must be at least 1)")
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)  # 5 min clock skew

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    first = sans[0].value
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(first))]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    files = TlsFiles(out / "ca.crt", out / "ca.key", out / "server.pem", out / "server.key")
    out.mkdir(parents=True, exist_ok=True)
    # Keys before certificates: a certificate on disk always has its key.
    write_atomic(files.ca_key, _key_pem(ca_key), 0o600)
    write_atomic(files.server_key, _key_pem(server_key), 0o600)
    write_atomic(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    write_atomic(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return files


def check_key_names(names: Sequence[str]) -> None:
    """Raise :class:`ValueError` unless ``names`` are distinct plain file names (letters, digits, ``_ . -``)."""
    if isinstance(names, str) or not names:
        raise ValueError("names: give at least one SuperNode name (as a list)")
    for name in names:
        if not isinstance(name, str) or not _KEY_NAME.match(name) or name.endswith(".pub"):
            raise ValueError(f"names: {name!r} is not usable as a key file name (letters, digits, _ . -)")
    if len(set(names)) != len(names):
        raise ValueError(f"names: duplicates in {list(names)}")


def _node_key_blobs(name: str) -> tuple[bytes, bytes]:
    """(OpenSSH private key, OpenSSH public key line ending in ``name``) of a fresh EC P-384 key pair."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" {name}\n".encode()


def write_site_key(out_dir: str | Path, name: str, *, overwrite: bool = False) -> NodeKeyPair:
    """Write one site's own SuperNode key pair, ``out_dir/<name>`` (0600) and ``<name>.pub``, without any CA.

    What a site makes for itself, so that its private key never leaves it: the coordinator registers only the
    ``.pub`` (``flwr supernode register``). The same formats as :func:`write_supernode_keys` (and as
    ``ssh-keygen -t ecdsa -b 384``), which Flower's SuperNode and ``flwr`` read. ``out_dir`` may hold other files
    (``ca.crt``); it is created with mode 0700. Raises :class:`ValueError` for a name that is not a plain file
    name, or if either key file exists (unless ``overwrite``): a key pair already registered is not replaced.
    """
    check_key_names([name])
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    pair = NodeKeyPair(out / name, out / f"{name}.pub")
    existing = [str(p) for p in (pair.private_key, pair.public_key) if p.exists()]
    if existing and not overwrite:
        raise ValueError(f"{' and '.join(existing)} already exist(s): a key pair the coordinator may have "
                         "registered is not replaced (overwrite, or --overwrite, does it)")
    private, public = _node_key_blobs(name)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(pair.private_key, private, 0o600)
    write_atomic(pair.public_key, public, 0o644)
    return pair


def write_supernode_keys(out_dir: str | Path, names: Sequence[str], *, overwrite: bool = False
                         ) -> dict[str, NodeKeyPair]:
    """Write one authentication key pair per SuperNode: ``<name>`` (OpenSSH private key, 0600), ``<name>.pub``.

    Register ``<name>.pub`` with ``flwr supernode register``; start the SuperNode with
    ``--auth-supernode-private-key <name>``. Raises :class:`ValueError` for a name that is not a plain file name,
    duplicate names, or an existing non-empty ``out_dir`` (unless ``overwrite``).
    """
    check_key_names(names)
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    blobs = {name: _node_key_blobs(name) for name in names}
    out.mkdir(parents=True, exist_ok=True)
    pairs: dict[str, NodeKeyPair] = {}
    for name, (private, public) in blobs.items():
        pair = NodeKeyPair(out / name, out / f"{name}.pub")
        write_atomic(pair.private_key, private, 0o600)
        write_atomic(pair.public_key, public, 0o644)
        pairs[name] = pair
    return pairs
