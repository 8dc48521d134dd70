# wsi-fl container images: one Dockerfile, two targets.
#
#   site    a hospital's image: `wsi-fl` (preprocessing, evaluation, `wsi-fl rehearse`) and Flower's SuperNode
#           with the site's own task runner next to the site's data. Entry point: wsi-fl-site-node
#           (docker/site-node.sh): `flower-supernode ARGS --isolation process` plus `wsi-fl site-runner`.
#   server  the coordinator's image: Flower's SuperLink, which runs the ServerApp in a subprocess, and `wsi-fl`
#           (`wsi-fl certs` writes the federation's certificates). Entry point: flower-superlink.
#
# Sites run only code they approved (docs/threat-model.md): Flower's default, `--isolation subprocess`, would
# import the ClientApp from the coordinator's app bundle. The site image's SuperNode runs with `--isolation
# process` and `wsi-fl site-runner` in the same container (one container per site: the read-only data mounts stay
# in one place and the Runtime API on 127.0.0.1), which runs the ClientApp installed here for app releases the
# site policy approves (approved-apps) and refuses the rest. The build records the hash of the release the image
# carries in /opt/wsi-fl/app.sha256 (`wsi-fl app-hash /opt/wsi-fl/app`, the bundle `wsi-fl rehearse` and the
# compose demo's coordinator ship): compare it with the one you reviewed before you approve it.
#
# Both run as the non-root user `app` (uid 49999, as Flower's own images). Volumes, by convention:
#   /data       read-only: slides, labels.csv, and at a SuperNode the preprocessing output (features/)
#   /certs      read-only: CA certificate, server certificate and key, SuperNode key pair
#   /config     read-only: the site policy (policy.toml)
#   /var/lib/wsi-fl   writable: preprocessing output, audit log, the ServerApp's checkpoints and metrics
#
# Build offline on a host without a Docker daemon or registry: scripts/build_image.sh (podman/buildah, a
# debootstrap'ed Debian as BASE_IMAGE, the torch wheel from a local directory). With a registry:
#   docker build --target site -t wsi-fl-site .
#   docker build --target site --build-arg TORCH_VARIANT=cuda -t wsi-fl-site:cuda .
#
# Build arguments:
#   BASE_IMAGE       a Debian 12 (bookworm) image [docker.io/library/debian:bookworm-slim]
#   TORCH_VARIANT    cpu | cuda: CPU build of torch, or PyPI's CUDA build (needs the NVIDIA container toolkit
#                    on the host at run time, no CUDA in the image: the wheels bring their CUDA libraries)
#   TORCH_CPU_INDEX  where the CPU build comes from [https://download.pytorch.org/whl/cpu]
#   WHEELS           a directory, mounted into the build, holding the torch wheel: used instead of any index
#   PIP_CERT         a CA bundle, mounted into the build, for pip behind a TLS-inspecting proxy
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim

# ---- deps: a virtual environment with the pinned dependencies (rebuilt only when docker/requirements.txt changes)
FROM ${BASE_IMAGE} AS deps
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3009
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3=3.11.2-1+b1 python3-venv=3.11.2-1+b1 \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# PIP_CERT: a CA bundle (mounted into the build) for pip when the network inspects TLS; empty: pip's own.
ARG PIP_CERT=
ARG TORCH_VARIANT=cpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG WHEELS=
# torch first: the CPU and CUDA builds differ here only. The CPU build's dependencies come pinned with the rest,
# below; the CUDA build brings its own (the nvidia-* CUDA libraries), which the lock does not list.
RUN case "${TORCH_VARIANT}" in \
      cpu) if [ -n "${WHEELS}" ]; then pip install --no-deps --no-index --find-links "${WHEELS}" torch==2.13.0; \
           else pip install --no-deps --index-url "${TORCH_CPU_INDEX}" torch==2.13.0; fi ;; \
      cuda) pip install torch==2.13.0 ;; \
      *) echo "TORCH_VARIANT must be cpu or cuda, not '${TORCH_VARIANT}'" >&2; exit 1 ;; \
    esac
COPY docker/requirements.txt /tmp/requirements.txt
RUN pip install --requirement /tmp/requirements.txt

# ---- app: the wsi-fl wheel (a code change rebuilds this and the last layer of the images, in seconds) -----
# and the Flower app's sources (/app), which `wsi-fl rehearse` ships as its FAB when run in the image. /app holds
# only the packages, so pyproject's fab-exclude (tests/, scripts/: every pattern must match a file in Flower
# 1.41) is dropped there; the FAB holds the same files as one built from a checkout.
FROM deps AS app
ARG PIP_CERT=
COPY setup.cfg pyproject.toml README.md LICENSE /src/
COPY preprocessing /src/preprocessing
COPY models /src/models
COPY wsi_fl /src/wsi_fl
RUN mkdir /app \
    && cp -r /src/pyproject.toml /src/README.md /src/LICENSE /src/preprocessing /src/models /src/wsi_fl /app/ \
    && sed -i '/^fab-exclude = /d' /app/pyproject.toml \
    && pip wheel --no-deps --wheel-dir /wheels /src

# ---- runtime: Debian + Python + the environment, nothing else ----------------------------------------------
FROM ${BASE_IMAGE} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# ca-certificates unpinned on purpose: Debian stable changes it only for security and trust-store fixes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3=3.11.2-1+b1 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 49999 app \
    && useradd --uid 49999 --gid 49999 --create-home --home-dir /home/app --shell /usr/sbin/nologin app \
    && mkdir -p /data /certs /config /var/lib/wsi-fl \
    && chown app:app /var/lib/wsi-fl
COPY --from=deps /opt/venv /opt/venv
# Offline by design: no telemetry, no update check, no installing a FAB's dependencies at run time. FLWR_HOME
# and the working directory (the ServerApp's default out-dir) are on the writable volume.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_HOME=/var/lib/wsi-fl/.flwr \
    MPLCONFIGDIR=/tmp/matplotlib \
    WSI_FL_APP=/opt/wsi-fl/app
LABEL org.opencontainers.image.title="wsi-fl" \
      org.opencontainers.image.description="Federated attention-MIL on whole-slide images (Flower)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
COPY --from=app /app /opt/wsi-fl/app
COPY --from=app /wheels /tmp/wheels
COPY docker/site-node.sh /usr/local/bin/wsi-fl-site-node
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels \
    && chmod 0755 /usr/local/bin/wsi-fl-site-node \
    && wsi-fl app-hash /opt/wsi-fl/app > /opt/wsi-fl/app.sha256 \
    && grep -qE '^sha256:[0-9a-f]{64}$' /opt/wsi-fl/app.sha256 \
    && wsi-fl --help > /dev/null \
    && wsi-fl rehearse --help > /dev/null \
    && wsi-fl certs --help > /dev/null \
    && python3 -c "import openslide, h5py, flwr, torch; import preprocessing.tv; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
VOLUME ["/var/lib/wsi-fl"]
WORKDIR /var/lib/wsi-fl
USER 49999:49999

# ---- site: SuperNode + the site's task runner (site-installed ClientApp) + wsi-fl for preprocessing --------
# The SuperNode only connects out (to the SuperLink); its Runtime API, which the runner polls, stays on
# 127.0.0.1 inside the container. Arguments are flower-supernode's. `podman run --entrypoint wsi-fl IMAGE
# preprocess ...` runs the preprocessing.
FROM runtime AS site
ENTRYPOINT ["wsi-fl-site-node"]
CMD ["--help"]

# ---- server: SuperLink (ServerApp in a subprocess) ---------------------------------------------------------
# Flower 1.41 serves SuperNodes and `flwr` on one HTTP port. The default command is the safe one: TLS with the
# certificates of `wsi-fl certs` in /certs and SuperNode authentication (register each site's public
# key with `flwr supernode register`). Plain HTTP needs an explicit `--insecure` in the command.
FROM runtime AS server
EXPOSE 8000
ENTRYPOINT ["flower-superlink"]
CMD ["--host", "0.0.0.0", "--port", "8000", "--ssl-ca-certfile", "/certs/ca.crt", \
     "--ssl-certfile", "/certs/server.pem", "--ssl-keyfile", "/certs/server.key", "--enable-supernode-auth", \
     "--disable-runtime-dependency-installation"]
