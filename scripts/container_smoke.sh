#!/usr/bin/env bash
# Build the Docker image without a Docker daemon and run the app inside it, network off.
#
#   bash scripts/container_smoke.sh            # as root; takes tens of minutes on 2 cores
#
# What it does (each step timed):
#   1. base image: the Dockerfile's FROM (debian:<point release>-slim) made offline with
#      debootstrap (Debian bookworm, minbase) + `podman import`, unless already in the store;
#   2. wheelhouse: the CPU build of torch copied out of pip's reach (`pip download --no-deps`)
#      and mounted into the build (the build reaches only the package registries);
#   3. `podman build --isolation=chroot --storage-driver=vfs --pull=never --format docker`
#      (Docker image format, so SHELL applies as with docker build), with this
#      machine's CA bundle mounted for pip (PIP_CERT build arg; never copied into the image);
#   4. `buildah run --isolation chroot` in the image, network off (chroot isolation refuses
#      `--network none`, so the run goes into an empty network namespace of its own with
#      `unshare --net`, which is what --network none does): the ENTRYPOINT's `--version`
#      (must equal bids_llm_encode.__version__), a check that the network really is off,
#      `bids_llm_encode_simulate` (2 participants, 8 mm), then `participant` and `group`
#      on it, and checks on the outputs;
#   5. `bids-validator-deno` (installed in the image, pinned as the [test] extra) inside the
#      image, network off, on its own derivatives and on the simulated input (-r): any
#      error fails the step.
# The build passes TEMPLATEFLOW_PREFETCH="" (the build reaches only the package registries,
# not TemplateFlow's S3): the smoke image holds the TemplateFlow skeleton only.
#
# Needs: podman, buildah, debootstrap (apt-get install -y podman buildah debootstrap).
# Environment: SMOKE_DIR (default /tmp/bids_llm_encode_smoke: wheelhouse, rootfs, data),
# SMOKE_ARGS (extra options for both levels), IMAGE (default
# bidsllmencode/bids_llm_encode:<version>), KEEP=1 keeps the working container,
# SMOKE_LAYERS=1 keeps every layer for a faster rebuild (by default the build commits once:
# one new layer, since with the vfs driver each layer is a full copy, ~2 GB here).
# Exit: 0 all steps passed; 1 a step failed (named); 2 a tool is missing.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
SMOKE_DIR="${SMOKE_DIR:-/tmp/bids_llm_encode_smoke}"
SMOKE_ARGS="${SMOKE_ARGS:-}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
PY="${PYTHON:-python3}"
VERSION="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' bids_llm_encode/__init__.py)"
IMAGE="${IMAGE:-bidsllmencode/bids_llm_encode:${VERSION}}"
BASE="$(awk 'toupper($1) == "FROM" {print $2; exit}' Dockerfile)"
TORCH_VERSION="$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)"
PODMAN=(podman --storage-driver vfs)
BUILDAH=(buildah --storage-driver vfs)

for tool in podman buildah debootstrap; do
  command -v "$tool" >/dev/null || {
    echo "container_smoke: $tool not found (apt-get install -y podman buildah debootstrap)" >&2
    exit 2
  }
done

t_all=$(date +%s)
step_t=0
step() { step_t=$(date +%s); echo; echo "=== [$(date +%T)] $*"; }
done_step() { echo "=== ok ($(( $(date +%s) - step_t )) s)"; }
fail() { echo "container_smoke: FAILED: $*" >&2; exit 1; }

mkdir -p "$SMOKE_DIR"

# 1. The base image, offline, tagged as the Dockerfile's FROM so --pull=never finds it.
step "base image ${BASE}"
if "${PODMAN[@]}" image exists "$BASE"; then
  echo "already in the store"
else
  rootfs="$SMOKE_DIR/rootfs"
  rm -rf "$rootfs"
  debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian \
    > "$SMOKE_DIR/debootstrap.log" 2>&1 || { tail -20 "$SMOKE_DIR/debootstrap.log"; fail "debootstrap"; }
  # The official image's apt sources (bookworm, updates, security) and its slim habits.
  rm -f "$rootfs/etc/apt/sources.list"
  cat > "$rootfs/etc/apt/sources.list.d/debian.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
  tar -C "$rootfs" -c . | "${PODMAN[@]}" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' - "$BASE"
  rm -rf "$rootfs"
fi
done_step

# 2. The CPU build of torch, from pip's own find-links (this machine's disk).
step "wheelhouse: torch==${TORCH_VERSION} (CPU build)"
wheelhouse="$SMOKE_DIR/wheelhouse"
mkdir -p "$wheelhouse"
if ! ls "$wheelhouse"/torch-"${TORCH_VERSION}"*.whl >/dev/null 2>&1; then
  "$PY" -m pip download --quiet --no-deps "torch==${TORCH_VERSION}" -d "$wheelhouse"
fi
ls "$wheelhouse"
ls "$wheelhouse" | grep -q "+cpu" || echo "warning: the wheel found is not a +cpu build"
done_step

# 3. The image.
step "podman build -t ${IMAGE}"
build_args=(
  --build-arg "VERSION=${VERSION}"
  --build-arg "TORCH_INDEX="
  --build-arg "WHEELHOUSE=/wheelhouse"
  --build-arg "TEMPLATEFLOW_PREFETCH="
)
mounts=(-v "${wheelhouse}:/wheelhouse:ro")
if [ -f "$CA_BUNDLE" ]; then
  mounts+=(-v "${CA_BUNDLE}:/host-ca.crt:ro")
  build_args+=(--build-arg "PIP_CERT=/host-ca.crt")
fi
if [ "${SMOKE_LAYERS:-0}" = 1 ]; then layering=(--layers); else layering=(--layers=false); fi
"${PODMAN[@]}" build --isolation=chroot --pull=never --format docker "${layering[@]}" \
  "${mounts[@]}" "${build_args[@]}" -t "$IMAGE" -f Dockerfile . \
  2>&1 | tee "$SMOKE_DIR/build.log" || fail "podman build (log: $SMOKE_DIR/build.log)"
"${PODMAN[@]}" image prune -f >/dev/null || true    # an older build of the same tag
"${PODMAN[@]}" images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -F "${IMAGE#*/}" || true
done_step

# 4. Runs inside the image, network off.
entrypoint="$("${PODMAN[@]}" image inspect --format '{{index .Config.Entrypoint 0}}' "$IMAGE")"
data="$SMOKE_DIR/data"
rm -rf "$data"
mkdir -p "$data"
chmod 0777 "$data"            # the image runs as a non-root user
ctr="$("${BUILDAH[@]}" from --pull=never --name "bids_llm_encode_smoke_$$" "$IMAGE")"
cleanup() { [ "${KEEP:-0}" = 1 ] || "${BUILDAH[@]}" rm "$ctr" >/dev/null 2>&1 || true; }
trap cleanup EXIT
# Progress bars (\r-separated) would flood the log: keep the other lines.
quiet_progress() { tr '\r' '\n' | grep --line-buffered -v -E 'it/s\]|s/it\]|tok/s\]|^ *$' || true; }
crun() {   # network none: a new, empty network namespace (only a loopback, down)
  unshare --net "${BUILDAH[@]}" run --isolation chroot -v "${data}:/data" "$ctr" -- "$@"
}

step "inside: ${entrypoint} --version"
got="$(crun "$entrypoint" --version)"
echo "$got"
[ "$got" = "bids_llm_encode ${VERSION}" ] || fail "--version printed '$got', expected 'bids_llm_encode ${VERSION}'"
crun sh -c 'echo "user $(id -u):$(id -g), cwd $(pwd)"; env | sort | grep -E "^(OMP_|HF_|TRANSFORMERS_|TEMPLATEFLOW_|NIPYPE_|BIDS_LLM_ENCODE_)"'
[ "$(crun id -u)" != 0 ] || fail "the image runs as root"
done_step

step "inside: the network is off"
ifaces="$(crun /opt/venv/bin/python -c "import socket; print(' '.join(n for _, n in socket.if_nameindex()))")"
echo "network interfaces inside: ${ifaces}"
[ "$ifaces" = lo ] || fail "network interfaces other than lo inside: ${ifaces}"
if crun /opt/venv/bin/python -c "import socket; socket.create_connection(('pypi.org', 443), 5)" 2>/dev/null; then
  fail "a connection to pypi.org succeeded with the network off"
fi
echo "no connection to pypi.org (as wanted)"
done_step

step "inside: bids_llm_encode_simulate /data/bids --participants 2 --resolution 8"
crun /opt/venv/bin/bids_llm_encode_simulate /data/bids --participants 2 --resolution 8 \
  || fail "simulate"
done_step

# shellcheck disable=SC2086  # SMOKE_ARGS is a list of options
step "inside: participant"
crun "$entrypoint" /data/bids /data/out participant -w /data/work $SMOKE_ARGS \
  2>&1 | tee "$SMOKE_DIR/participant.log" | quiet_progress \
  || fail "participant (log: $SMOKE_DIR/participant.log)"
done_step

# shellcheck disable=SC2086
step "inside: group"
crun "$entrypoint" /data/bids /data/out group -w /data/work $SMOKE_ARGS \
  2>&1 | tee "$SMOKE_DIR/group.log" | quiet_progress \
  || fail "group (log: $SMOKE_DIR/group.log)"
done_step

step "outputs"
[ -f "$data/out/dataset_description.json" ] || fail "no dataset_description.json"
grep -q "bidsllmencode/bids_llm_encode:${VERSION}" "$data/out/dataset_description.json" \
  || fail "dataset_description.json does not name the container"
ls "$data"/out/group/*_networks.tsv >/dev/null 2>&1 || fail "no group *_networks.tsv"
find "$data/out" -maxdepth 2 | sort | head -40
done_step

# 5. The BIDS validator of the image on the image's own outputs (and on its input).
step "inside: bids-validator-deno on /data/out and -r /data/bids"
crun /opt/venv/bin/bids-validator-deno --version || fail "no bids-validator-deno in the image"
for target in /data/out "-r /data/bids"; do
  name="$(echo "$target" | tr -c 'a-z0-9' '_')"
  # shellcheck disable=SC2086  # "-r /data/bids" is two words on purpose
  crun /opt/venv/bin/bids-validator-deno --format json $target \
    > "$SMOKE_DIR/validator${name}.json" 2> "$SMOKE_DIR/validator${name}.log" || true
  n_errors="$("$PY" -c 'import json, sys
issues = json.load(open(sys.argv[1]))["issues"]["issues"]
bad = [(i["code"], i.get("location")) for i in issues if i["severity"] == "error"]
print(len(bad)); [print(c, loc, file=sys.stderr) for c, loc in bad[:20]]' \
    "$SMOKE_DIR/validator${name}.json")" || fail "bids-validator-deno gave no JSON for ${target} (log: $SMOKE_DIR/validator${name}.log)"
  echo "bids-validator-deno ${target}: ${n_errors} errors"
  [ "$n_errors" = 0 ] || fail "bids-validator-deno: ${n_errors} errors in ${target} (json: $SMOKE_DIR/validator${name}.json)"
done
done_step

echo
echo "container_smoke: PASSED in $(( $(date +%s) - t_all )) s (image ${IMAGE}, outputs in ${data}/out)"
