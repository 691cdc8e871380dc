#!/usr/bin/env bash
# Creates a Cloud TPU VM (one host or a multi-host slice) for jaxpost.
#
#   scripts/tpu/create.sh --name NAME --zone ZONE [--accelerator-type TYPE]
#       [--version RUNTIME] [--spot] [--queued] [--project P] [--dry-run]
#
#   --accelerator-type  TPU type and size (default v5litepod-16: 4 hosts of 4 chips)
#   --version           TPU VM runtime image (default v2-alpha-tpuv5-lite; v4:
#                       tpu-ubuntu2204-base, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e)
#   --spot              spot capacity (cheaper, can be preempted: jaxpost resumes)
#   --queued            ask through a queued resource and wait until it is ACTIVE
#                       (the way to get large slices and spot capacity that is scarce)
#   --dry-run           print the gcloud commands only
# NAME, ZONE and the project may also come from JAXPOST_TPU_NAME / _ZONE / _PROJECT.

set -euo pipefail
# shellcheck source=scripts/tpu/lib.sh
source "$(dirname "$0")/lib.sh"

ACCELERATOR="v5litepod-16"
VERSION="v2-alpha-tpuv5-lite"
SPOT=0
QUEUED=0
while [[ $# -gt 0 ]]; do
  if take_common "$@"; then shift "$SHIFT"; continue; fi
  case "$1" in
    --accelerator-type) ACCELERATOR="${2:?}"; shift 2 ;;
    --accelerator-type=*) ACCELERATOR="${1#*=}"; shift ;;
    --version) VERSION="${2:?}"; shift 2 ;;
    --version=*) VERSION="${1#*=}"; shift ;;
    --spot) SPOT=1; shift ;;
    --queued) QUEUED=1; shift ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
require_common
location_flags

extra=()
if [[ "$SPOT" == 1 ]]; then
  extra+=(--spot)
fi
if [[ "$QUEUED" == 0 ]]; then
  run gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}" \
    --accelerator-type="$ACCELERATOR" --version="$VERSION" "${extra[@]}"
  exit 0
fi

run gcloud compute tpus queued-resources create "$NAME" "${LOCATION[@]}" \
  --node-id="$NAME" --accelerator-type="$ACCELERATOR" --runtime-version="$VERSION" \
  "${extra[@]}"
if [[ "$DRY_RUN" == 1 ]]; then
  echo "# then wait until: gcloud compute tpus queued-resources describe $NAME --zone=$ZONE shows ACTIVE"
  exit 0
fi
echo "waiting for queued resource $NAME to become ACTIVE (Ctrl-C stops waiting, not the request)"
while true; do
  state="$(gcloud compute tpus queued-resources describe "$NAME" "${LOCATION[@]}" \
    --format='value(state.state)')"
  case "$state" in
    ACTIVE) echo "$NAME is ACTIVE"; break ;;
    FAILED|SUSPENDED) die "queued resource $NAME is $state (describe it for the reason)" ;;
    *) echo "  state: ${state:-unknown}"; sleep "${JAXPOST_TPU_POLL_S:-30}" ;;
  esac
done
