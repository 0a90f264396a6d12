# syntax=docker/dockerfile:1
#
# The gateway image: a virtualenv built in one stage, copied into a clean runtime stage.
#
# Base: Debian slim, not Alpine. uvloop, hiredis, asyncpg, orjson and pydantic-core ship
# manylinux (glibc) wheels that pip installs as they are; on Alpine (musl) pip has to find
# musllinux wheels for every one of them or compile it (a C toolchain, and Rust for orjson
# and pydantic-core), which makes builds slow and fragile and the build stage bigger, for
# a final image that is hardly smaller once the libraries are in. musl's allocator and
# resolver also behave differently under load. Pin the base by digest in your registry
# mirror (python:3.11-slim-bookworm@sha256:...) for reproducible builds.
#
# Runtime contract (k8s/base): runs as the numeric user 10001 with a read-only root
# filesystem (only /tmp, an emptyDir, is writable; no .pyc is written); the probes are
# HTTP (/startupz, /livez, /readyz on port 8000), so no shell or curl is needed in the
# image; the exec-form ENTRYPOINT makes the gateway PID 1, so it receives SIGTERM itself
# and drains (drain.delay_s + drain.timeout_s) before exiting. It starts no child
# processes, so no init process is needed to reap zombies.
#
# The build steps of the `build` stage are reproduced without Docker by
# tests/deploy/test_dockerfile.py: keep them to ENV, WORKDIR, COPY and RUN.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --------------------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build

ENV VIRTUAL_ENV=/opt/venv \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
ENV PATH="${VIRTUAL_ENV}/bin:${PATH}"
WORKDIR /src

RUN python -m venv "${VIRTUAL_ENV}"

# The hot modules are compiled (setup.py, GATEWAY_COMPILE=1): a C compiler and the Python
# headers, in this stage only. The official python image has the headers (its Python is
# in /usr/local); a base with Debian's python3 needs python3-dev. Installed only when
# missing, from the distribution as it is: nothing of it reaches the runtime stage.
# hadolint ignore=DL3008
RUN if ! command -v gcc >/dev/null \
        || ! python -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("include"), "Python.h")))'; then \
        headers=$(python -c 'import sys; print("" if sys.base_prefix == "/usr/local" else "python3-dev")') \
        && apt-get update \
        && apt-get install -y --no-install-recommends gcc libc6-dev ${headers:+"$headers"} \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# Dependencies in a layer of their own, from the hashed lock (exact versions, every file
# checked against its hash): the image built next month holds what CI tested today. The
# layer is rebuilt when a lock changes, not on every change of the source. build.lock is
# what pip needs to install the gateway itself (setuptools, wheel), also hashed.
COPY requirements/runtime.lock requirements/build.lock requirements/compile.lock ./requirements/
RUN pip install --no-cache-dir --require-hashes \
        --requirement requirements/runtime.lock --requirement requirements/build.lock \
        --requirement requirements/compile.lock

# The gateway itself, without touching the dependencies again (pip compiles its .pyc
# here, so the read-only runtime never needs to write one), its hot modules compiled
# (`gateway --version` says "compiled"; the build fails rather than ship pure Python
# unnoticed). README.md stays out: setuptools only warns, and a documentation change does
# not rebuild this layer. Then the installers and the compiler leave the venv: it runs
# without pip, setuptools, wheel or mypy, and a package manager has no business in a
# read-only container.
COPY pyproject.toml setup.py ./
COPY gateway/ ./gateway/
RUN GATEWAY_COMPILE=1 pip install --no-cache-dir --no-deps --no-build-isolation . \
    && gateway --version \
    && python -I -c 'import gateway, sys; sys.exit(not gateway.compiled())' \
    && pip uninstall --yes --no-cache-dir mypy mypy-extensions pathspec librt ast-serialize \
        types-PyYAML setuptools wheel packaging pip

# --------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="gateway" \
      org.opencontainers.image.description="Sidecar reverse proxy: rate limits, bans, circuit breakers, health probes and metrics for the application in its pod." \
      org.opencontainers.image.licenses="MIT"

ENV VIRTUAL_ENV=/opt/venv \
    PATH="/opt/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp

COPY --from=build /opt/venv /opt/venv
# A default for `serve`; Kubernetes mounts its ConfigMap over /etc/gateway as a directory
# (and compose mounts ./config there). `gateway demo` brings its own config.
COPY config/gateway.yaml /etc/gateway/gateway.yaml

USER 10001:10001
EXPOSE 8000 9901
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway"]
CMD ["serve", "--config", "/etc/gateway/gateway.yaml"]
