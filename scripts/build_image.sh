#!/usr/bin/env bash
# Build the wsi-fl container images without a Docker daemon and without an image registry.
#
#   sudo scripts/build_image.sh                      # both images: localhost/wsi-fl-site, localhost/wsi-fl-server
#   sudo scripts/build_image.sh --target site --variant cuda --tag 0.1.0-cuda
#
# 1. The base image: a minimal Debian 12 made by debootstrap from the Debian mirror (the one package source a
#    hospital network usually reaches) and imported with `podman import` as localhost/wsi-fl-base:bookworm.
#    Made once; --rebuild-base makes it again. --base IMAGE uses an image you already have instead.
# 2. The Dockerfile's targets, built by buildah with --isolation chroot (no daemon, no user namespaces, works
#    inside a container or VM). pip inside the build reaches the package index through the host's network and
#    trusts the host's CA bundle (--ca-bundle, mounted read-only), and takes torch from --wheels when given.
#
# Options:
#   --target site|server|all   which image(s) [all]
#   --variant cpu|cuda         torch build [cpu]
#   --tag TAG                  image tag [latest]
#   --wheels DIR               directory with the torch wheel [the first $PIP_FIND_LINKS directory holding one]
#   --ca-bundle FILE           CA bundle pip trusts inside the build [$PIP_CERT, else /etc/ssl/certs/ca-certificates.crt]
#   --base IMAGE               base image [localhost/wsi-fl-base:bookworm, made by debootstrap if missing]
#   --mirror URL               Debian mirror for debootstrap [http://deb.debian.org/debian]
#   --security-mirror URL      Debian security mirror [http://deb.debian.org/debian-security]
#   --rebuild-base             make the debootstrap base again
# Needs root (debootstrap, rootful podman storage) and Debian's podman, buildah and debootstrap packages.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TARGET=all VARIANT=cpu TAG=latest WHEELS="" CA_BUNDLE="" BASE="" REBUILD_BASE=0
MIRROR=http://deb.debian.org/debian SECURITY_MIRROR=http://deb.debian.org/debian-security
DEFAULT_BASE=localhost/wsi-fl-base:bookworm

die() { echo "build_image.sh: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --target) TARGET="${2:?}"; shift 2 ;;
    --variant) VARIANT="${2:?}"; shift 2 ;;
    --tag) TAG="${2:?}"; shift 2 ;;
    --wheels) WHEELS="${2:?}"; shift 2 ;;
    --ca-bundle) CA_BUNDLE="${2:?}"; shift 2 ;;
    --base) BASE="${2:?}"; shift 2 ;;
    --mirror) MIRROR="${2:?}"; shift 2 ;;
    --security-mirror) SECURITY_MIRROR="${2:?}"; shift 2 ;;
    --rebuild-base) REBUILD_BASE=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
case "$TARGET" in site|server) TARGETS=("$TARGET") ;; all) TARGETS=(site server) ;;
  *) die "--target must be site, server or all, not '$TARGET'" ;; esac
case "$VARIANT" in cpu|cuda) ;; *) die "--variant must be cpu or cuda, not '$VARIANT'" ;; esac
for tool in podman buildah; do
  command -v "$tool" > /dev/null || die "$tool not found: apt-get install podman buildah debootstrap"
done

# torch wheel: only the CPU build can come from a directory (the CUDA build is PyPI's default one).
if [[ -z "$WHEELS" && "$VARIANT" == cpu ]]; then
  for dir in ${PIP_FIND_LINKS:-}; do
    if compgen -G "$dir/torch-2.13.0*-cp311-*.whl" > /dev/null; then WHEELS="$dir"; break; fi
  done
fi
if [[ -n "$WHEELS" ]]; then
  [[ "$VARIANT" == cpu ]] || die "--wheels is for the CPU build; the CUDA build comes from the package index"
  compgen -G "$WHEELS/torch-2.13.0*-cp311-*.whl" > /dev/null \
    || die "--wheels $WHEELS: no torch-2.13.0 wheel for Python 3.11 there"
  WHEELS="$(cd "$WHEELS" && pwd)"
fi
CA_BUNDLE="${CA_BUNDLE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}"
[[ -r "$CA_BUNDLE" ]] || die "--ca-bundle $CA_BUNDLE: not a readable file"

# 1. the base image
if [[ -z "$BASE" ]]; then
  BASE="$DEFAULT_BASE"
  if [[ "$REBUILD_BASE" == 1 ]] || ! podman image exists "$BASE"; then
    command -v debootstrap > /dev/null || die "debootstrap not found: apt-get install debootstrap"
    rootfs="$(mktemp -d "${TMPDIR:-/var/tmp}/wsi-fl-rootfs.XXXXXX")"
    trap 'rm -rf "$rootfs"' EXIT
    echo "== debootstrap Debian 12 (minbase) from $MIRROR" >&2
    debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" > "$rootfs.log" 2>&1 \
      || { tail -20 "$rootfs.log" >&2; die "debootstrap failed (log: $rootfs.log)"; }
    rm -f "$rootfs.log"
    # Stable, its point-release updates and security updates: an image rebuilt later gets the fixes.
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s bookworm-security main\n' \
      "$MIRROR" "$MIRROR" "$SECURITY_MIRROR" > "$rootfs/etc/apt/sources.list"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE" > /dev/null
    rm -rf "$rootfs"; trap - EXIT
    echo "== base image $BASE" >&2
  fi
fi

# 2. the images (docker format: OCI images drop SHELL)
volumes=(--volume "$CA_BUNDLE:/run/wsi-fl-build/ca.crt:ro")
build_args=(--build-arg "BASE_IMAGE=$BASE" --build-arg "TORCH_VARIANT=$VARIANT"
            --build-arg "PIP_CERT=/run/wsi-fl-build/ca.crt")
if [[ -n "$WHEELS" ]]; then
  volumes+=(--volume "$WHEELS:/run/wsi-fl-build/wheels:ro")
  build_args+=(--build-arg "WHEELS=/run/wsi-fl-build/wheels")
fi
for target in "${TARGETS[@]}"; do
  image="localhost/wsi-fl-$target:$TAG"
  echo "== building $image (torch $VARIANT)" >&2
  buildah bud --isolation chroot --layers --format docker --target "$target" --tag "$image" \
    "${volumes[@]}" "${build_args[@]}" --file "$ROOT/Dockerfile" "$ROOT"
  echo "built $image" >&2
done
