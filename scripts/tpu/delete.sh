#!/usr/bin/env bash
# Deletes a TPU VM (or its queued resource, which deletes the VM with it).
#
#   scripts/tpu/delete.sh --name NAME --zone ZONE [--queued] [--project P] [--dry-run]
#
#   --queued   it was created with create.sh --queued

set -euo pipefail
# shellcheck source=scripts/tpu/lib.sh
source "$(dirname "$0")/lib.sh"

QUEUED=0
while [[ $# -gt 0 ]]; do
  if take_common "$@"; then shift "$SHIFT"; continue; fi
  case "$1" in
    --queued) QUEUED=1; shift ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
require_common
location_flags

if [[ "$QUEUED" == 1 ]]; then
  run gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet
fi
