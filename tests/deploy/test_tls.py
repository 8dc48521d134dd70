"""TLS certificates and SuperNode keys (:mod:`wsi_fl.deploy.certs`), and a deployment with TLS and authentication on.

The slow test rehearses a federation (:func:`wsi_fl.engines.deployment.rehearse`, ``wsi-fl rehearse``) as a
hospital federation would run: HTTPS everywhere, only registered SuperNodes admitted. One extra SuperNode
with an unregistered key must be refused while the three registered sites train.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import tomllib
from bagsites import make_cohort
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store
from processes import left_running

from wsi_fl.cli.main import main
from wsi_fl.deploy import certs as tlscerts
from wsi_fl.deploy.certs import write_supernode_keys, write_tls_certificates
from wsi_fl.engines import deployment
from wsi_fl.engines._flower import CONNECTION, write_flwr_config
from wsi_fl.engines._processes import tail


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _verify(files: tlscerts.TlsFiles, name: x509.GeneralName) -> None:
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    leaf = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    PolicyBuilder().store(Store([ca])).build_server_verifier(name).verify(leaf, [])


def test_server_certificate_verifies_against_the_ca_for_every_host(tmp_path):
    files = write_tls_certificates(tmp_path / "tls", ["localhost", "127.0.0.1", "::1", "Link.Example.org."])
    for name in (x509.DNSName("localhost"), x509.DNSName("link.example.org"),
                 x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))):
        _verify(files, name)
    with pytest.raises(x509.verification.VerificationError):
        _verify(files, x509.DNSName("elsewhere.org"))
    leaf = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "link.example.org"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert _mode(files.ca_key) == _mode(files.server_key) == 0o600
    assert not [p for p in (tmp_path / "tls").iterdir() if p.name.startswith(".")]


def test_tls_handshake_with_the_written_files(tmp_path):
    """What the SuperLink (server) and a SuperNode or ``flwr`` (client, CA as root) do, over a socket pair."""
    files = write_tls_certificates(tmp_path / "tls", ["localhost", "127.0.0.1"])
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(files.server_cert, files.server_key)
    client_ctx = ssl.create_default_context(cafile=str(files.ca_cert))  # hostname check and verification on
    for hostname in ("127.0.0.1", "localhost"):
        a, b = socket.socketpair()
        with a, b:
            server = threading.Thread(target=lambda sock=a: server_ctx.wrap_socket(sock, server_side=True)
                                      .sendall(b"ok"))
            server.start()
            with client_ctx.wrap_socket(b, server_hostname=hostname) as tls:
                assert tls.recv(2) == b"ok"
            server.join(10)
    a, b = socket.socketpair()
    with a, b:  # a client that does not trust our CA refuses the server
        threading.Thread(target=lambda: _ignore(lambda: server_ctx.wrap_socket(a, server_side=True)),
                         daemon=True).start()
        with pytest.raises(ssl.SSLCertVerificationError):
            ssl.create_default_context().wrap_socket(b, server_hostname="localhost")


def _ignore(fn) -> None:
    with contextlib.suppress(OSError, ssl.SSLError):
        fn()


def test_supernode_keys_are_in_the_formats_flower_reads(tmp_path):
    with warnings.catch_warnings():  # typer, imported by flwr.cli, uses deprecated click helpers
        warnings.simplefilter("ignore", DeprecationWarning)
        from flwr.cli.supernode.register import try_load_public_key  # what `flwr supernode register` runs

    pairs = write_supernode_keys(tmp_path / "keys", ["site_1", "site_2"])
    assert set(pairs) == {"site_1", "site_2"}
    for name, pair in pairs.items():
        assert _mode(pair.private_key) == 0o600 and _mode(pair.public_key) == 0o644
        # flower-supernode --auth-supernode-private-key reads it with load_ssh_private_key
        private = serialization.load_ssh_private_key(pair.private_key.read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert pair.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
        assert pair.public_key.read_text().rstrip().endswith(f" {name}")
        assert try_load_public_key(pair.public_key) == private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert pairs["site_1"].public_key.read_text() != pairs["site_2"].public_key.read_text()


@pytest.mark.parametrize("hosts, message", [
    ([], "at least one"), ("localhost", "at least one"), (["bad host"], "neither an IP address"),
    (["10.0.0.300"], "not a valid IP address"), (["-x.org"], "neither"), (["a..b"], "neither"),
    ([""], "neither"), ([7], "not a string"), (["x" * 64 + ".org"], "neither")])
def test_bad_hosts_are_one_line_errors(tmp_path, hosts, message):
    with pytest.raises(ValueError, match=message):
        write_tls_certificates(tmp_path / "tls", hosts)
    assert not (tmp_path / "tls").exists()


@pytest.mark.parametrize("names, message", [
    ([], "at least one"), (["../x"], "key file name"), ([".hidden"], "key file name"), (["a.pub"], "key file name"),
    (["a b"], "key file name"), (["a", "a"], "duplicates")])
def test_bad_key_names_are_one_line_errors(tmp_path, names, message):
    with pytest.raises(ValueError, match=message):
        write_supernode_keys(tmp_path / "keys", names)
    assert not (tmp_path / "keys").exists()


def test_existing_output_directory_needs_overwrite(tmp_path):
    out = tmp_path / "tls"
    first = write_tls_certificates(out, ["localhost"])
    before = first.server_cert.read_bytes()
    with pytest.raises(ValueError, match="already exists"):
        write_tls_certificates(out, ["localhost"])
    with pytest.raises(ValueError, match="already exists"):
        write_supernode_keys(out, ["site_1"])
    assert first.server_cert.read_bytes() == before
    again = write_tls_certificates(out, ["localhost"], overwrite=True)
    assert again.server_cert.read_bytes() != before and _mode(again.server_key) == 0o600
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        write_tls_certificates(tmp_path / "file", ["localhost"], overwrite=True)
    with pytest.raises(ValueError, match="days"):
        write_tls_certificates(tmp_path / "new", ["localhost"], days=0)
    (tmp_path / "empty").mkdir()
    write_supernode_keys(tmp_path / "empty", ["site_1"])  # an empty directory is fine (e.g. from mkdtemp)


def test_no_half_written_files(tmp_path, monkeypatch):
    """A write that fails leaves the earlier files complete, the failed one absent and no temporary file."""
    out = tmp_path / "tls"
    real_replace, calls = os.replace, []

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(tlscerts.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_tls_certificates(out, ["localhost"])
    assert sorted(p.name for p in out.iterdir()) == ["ca.key"]  # keys first; no ".ca.key.xxx.tmp" left
    serialization.load_pem_private_key((out / "ca.key").read_bytes(), None)
    monkeypatch.setattr(tlscerts.os, "replace", real_replace)

    def failing_fsync(fd):
        raise OSError("I/O error")

    monkeypatch.setattr(tlscerts.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="I/O error"):
        write_supernode_keys(tmp_path / "keys", ["site_1"])
    assert list((tmp_path / "keys").iterdir()) == []


def test_certs_command(tmp_path, capsys):
    out = subprocess.run([sys.executable, "-m", "wsi_fl", "certs", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--hosts" in out.stdout and "--sites" in out.stdout
    argv = ["certs", "--out", str(tmp_path / "c"), "--hosts", "localhost", "127.0.0.1", "--sites", "site_1", "site_2"]
    assert main(argv) == 0
    assert "SuperLink: " in capsys.readouterr().out
    names = {p.relative_to(tmp_path / "c").as_posix() for p in (tmp_path / "c").rglob("*") if p.is_file()}
    assert names == {"ca.crt", "ca.key", "server.pem", "server.key", "supernodes/site_1", "supernodes/site_1.pub",
                     "supernodes/site_2", "supernodes/site_2.pub"}
    assert main(argv) == 2  # a usage error: one line, nothing replaced
    err = capsys.readouterr().err
    assert err.startswith("wsi-fl certs: error: ") and "already exists" in err and err.count("\n") == 1, err
    assert main([*argv, "--overwrite"]) == 0
    assert main(["certs", "--out", str(tmp_path / "d"), "--hosts", "localhost", "--sites", "../x"]) == 2
    assert "key file name" in capsys.readouterr().err and not (tmp_path / "d").exists()  # checked before writing
    assert main(["certs", "--out", str(tmp_path / "e"), "--hosts", "localhost", "127.0.0.300"]) == 2
    assert "not a valid IP address" in capsys.readouterr().err and not (tmp_path / "e").exists()


def test_flwr_connection_uses_the_ca(tmp_path):
    write_flwr_config(tmp_path / "home", 9093, tmp_path / "tls" / "ca.crt")
    connection = tomllib.loads((tmp_path / "home" / "config.toml").read_text())["superlink"][CONNECTION]
    assert connection == {"address": "127.0.0.1:9093", "insecure": False,
                          "root-certificates": str((tmp_path / "tls" / "ca.crt").resolve())}
    write_flwr_config(tmp_path / "home", 9093)
    connection = tomllib.loads((tmp_path / "home" / "config.toml").read_text())["superlink"][CONNECTION]
    assert connection == {"address": "127.0.0.1:9093", "insecure": True}
    make_cohort(tmp_path / "cohort", sizes=(4, 4))
    with pytest.raises(ValueError, match="--insecure"):
        deployment.rehearse(tmp_path / "cohort", tmp_path / "out", 1, insecure=True, unregistered_site="site_1")
    with pytest.raises(ValueError, match="not a site"):
        deployment.rehearse(tmp_path / "cohort", tmp_path / "out", 1, unregistered_site="site_9")


@pytest.mark.slow
def test_tls_federation_refuses_an_unregistered_supernode(tmp_path):
    """TLS and SuperNode authentication on (the default); site_3 also has an impostor with an unregistered key.

    The SuperLink refuses the impostor (Flower exit code 305, API error 2004), the three registered sites train
    round 1, and every process the rehearsal started is gone afterwards.
    """
    make_cohort(tmp_path / "cohort")
    out, work = tmp_path / "out", tmp_path / "work"
    result = deployment.rehearse(
        tmp_path / "cohort", out, rounds=1, workdir=work, timeout=600, unregistered_site="site_3",
        run_config="min-available-nodes=3 test-frac=0.3 hidden-dim=32 attn-dim=16")
    logs = Path(result["logs"])
    tails = "\n".join(tail(p) for p in sorted(logs.glob("*.log")))
    assert result["status"] == "finished:completed", tails
    assert result["ok"] and result["tls"] and result["auth"], tails
    refused = result["unregistered"]
    assert refused["site"] == "site_3" and refused["refused"] and refused["exit_code"] == 1, (refused, tails)
    impostor_log = (logs / "unregistered-site_3.log").read_text()
    assert all(marker in impostor_log for marker in deployment.REFUSED_MARKERS), impostor_log
    superlink_log = (logs / "superlink.log").read_text()
    assert "Uvicorn running on https://" in superlink_log  # HTTPS, not HTTP
    assert "ApiError:2004" in superlink_log and "No SuperNode found with the given public key" in superlink_log
    assert set(result["nodes"]) == {"site_1", "site_2", "site_3"} and len(set(result["nodes"].values())) == 3
    for site, node_id in result["nodes"].items():  # each registered SuperNode came up as its registered node
        assert f"SuperNode ID: {node_id}" in (logs / f"supernode-{site}.log").read_text()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1]
    assert rows[0]["aggregated"] == 3 and rows[0]["eval-replies"] == 3, rows[0]
    # Every process was stopped (and reaped), and nothing they started is left running.
    # (each registered site's task runner too: the SuperNodes run with --isolation process)
    assert set(result["pids"]) == {"superlink", "unregistered-site_3",
                                   *(f"{kind}-site_{k}" for kind in ("supernode", "runner") for k in (1, 2, 3))}
    for pid in result["pids"].values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    if Path("/proc/self/environ").exists():
        deadline = time.monotonic() + 15
        while (left := left_running(work / "flwr-home")) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"processes left running: {left}"
