#!/usr/bin/env bash
# Copies a run folder (metrics.jsonl, TensorBoard events, checkpoints) from worker 0 of
# a TPU VM to this machine.
#
#   scripts/tpu/fetch.sh --name NAME --zone ZONE --workdir DIR [--dest LOCAL_DIR]
#       [--project P] [--dry-run]
#
#   --workdir   the run folder on the workers (as given to launch.sh)
#   --dest      where to put it here (default ./runs/NAME)

set -euo pipefail
# shellcheck source=scripts/tpu/lib.sh
source "$(dirname "$0")/lib.sh"

WORKDIR=""
DEST=""
while [[ $# -gt 0 ]]; do
  if take_common "$@"; then shift "$SHIFT"; continue; fi
  case "$1" in
    --workdir) WORKDIR="${2:?}"; shift 2 ;;
    --workdir=*) WORKDIR="${1#*=}"; shift ;;
    --dest) DEST="${2:?}"; shift 2 ;;
    --dest=*) DEST="${1#*=}"; shift ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
require_common
[[ -n "$WORKDIR" ]] || die "--workdir is required (the run folder on the workers)"
DEST="${DEST:-runs/$NAME}"
location_flags

run mkdir -p "$DEST"
run gcloud compute tpus tpu-vm scp --recurse "$NAME:$WORKDIR" "$DEST" "${LOCATION[@]}" \
  --worker=0
