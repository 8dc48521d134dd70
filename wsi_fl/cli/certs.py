"""``wsi-fl certs``: TLS certificates and SuperNode authentication keys for a Flower federation.

A site makes its own SuperNode key pair, with no CA, so that its private key never leaves it::

    wsi-fl certs --site-key site_1 --out /etc/wsi-fl/certs

writes ``site_1`` (the private key, mode 0600, for ``--auth-supernode-private-key``) and ``site_1.pub`` (an
EC P-384 OpenSSH public key, what the coordinator registers with ``flwr supernode register``); an existing key
is not replaced unless ``--overwrite``. The coordinator makes the CA and the SuperLink's certificate::

    wsi-fl certs --out certs --hosts superlink.hospital-net.org 10.0.0.5 --sites site_1 site_2 site_3

writes ``certs/ca.crt`` and ``certs/ca.key`` (a CA), ``certs/server.pem`` and
``certs/server.key`` (the SuperLink's certificate, signed by the CA, valid for
every ``--hosts`` name and address) and, with ``--sites``,
``certs/supernodes/<site>`` and ``<site>.pub`` (one EC key pair per site).
Private keys are mode 0600; keep ``ca.key`` offline and give each site only
``ca.crt`` and its own private key. Then::

    flower-superlink --ssl-ca-certfile certs/ca.crt --ssl-certfile certs/server.pem \\
        --ssl-keyfile certs/server.key --enable-supernode-auth
    flwr supernode register certs/supernodes/site_1.pub <connection>   # once per site
    flower-supernode --superlink HOST:PORT --root-certificates ca.crt --auth-supernode-private-key site_1 ...

with ``root-certificates = "/abs/path/ca.crt"`` in the ``flwr`` connection of
``$FLWR_HOME/config.toml``. An existing non-empty ``--out`` is refused unless
``--overwrite``. Every input is checked before anything is written (a bad host
or site name: exit 2, nothing on disk).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from wsi_fl.cli._common import EXIT_FAILED, EXIT_OK, UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("certs", help="write a CA, the SuperLink's TLS certificate and SuperNode key pairs, "
                                     "or a site's own key pair", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="directory to write (created)")
    p.add_argument("--site-key", metavar="SITE",
                   help="a site's own SuperNode key pair only (OUT/SITE, OUT/SITE.pub): no CA, no --hosts")
    p.add_argument("--hosts", nargs="+",
                   help="hostnames and IP addresses the SuperLink is reached at, e.g. localhost 127.0.0.1")
    p.add_argument("--sites", nargs="+", default=[], help="also write one SuperNode key pair per site")
    p.add_argument("--days", type=int, default=365, help="validity of the certificates in days [%(default)s]")
    p.add_argument("--overwrite", action="store_true", help="replace the files in an existing --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from wsi_fl.deploy.certs import (
        check_key_names,
        parse_hosts,
        write_site_key,
        write_supernode_keys,
        write_tls_certificates,
    )

    if args.site_key is not None:
        if args.hosts or args.sites:
            raise UsageError("--site-key makes one site's key pair alone: leave out --hosts and --sites")
        try:
            pair = write_site_key(args.out, args.site_key, overwrite=args.overwrite)
        except ValueError as err:
            raise UsageError(str(err)) from err
        except OSError as err:
            print(f"wsi-fl certs: {err}", file=sys.stderr)
            return EXIT_FAILED
        print(f"{args.site_key}: private key {pair.private_key} (keep it here; mode 0600)\n"
              f"send the public key {pair.public_key} to the coordinator, who registers it")
        return EXIT_OK
    if not args.hosts:
        raise UsageError("give --hosts (the coordinator's CA and SuperLink certificate) or --site-key SITE "
                         "(a site's own key pair)")
    try:
        parse_hosts(args.hosts)  # every input is checked before anything is written
        if args.sites:
            check_key_names(args.sites)
        tls = write_tls_certificates(args.out, args.hosts, days=args.days, overwrite=args.overwrite)
        keys = write_supernode_keys(args.out / "supernodes", args.sites, overwrite=args.overwrite) \
            if args.sites else {}
    except ValueError as err:  # a bad host, site name or --days, or an existing --out: the user's to fix
        raise UsageError(str(err)) from err
    except OSError as err:  # the disk's (permissions, space): not a usage error, but still one line
        print(f"wsi-fl certs: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(f"CA: {tls.ca_cert} (key {tls.ca_key})\nSuperLink: {tls.server_cert} (key {tls.server_key}) "
          f"for {', '.join(args.hosts)}")
    for site, pair in keys.items():
        print(f"{site}: {pair.private_key} (register {pair.public_key})")
    return EXIT_OK
