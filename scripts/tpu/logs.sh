#!/usr/bin/env bash
# Shows (and follows) the training log of one worker; process 0 (worker 0) is the one
# that logs progress and metrics, the others only warnings and errors.
#
#   scripts/tpu/logs.sh --name NAME --zone ZONE [--worker N] [--lines N] [--no-follow]
#       [--project P] [--dry-run]

set -euo pipefail
# shellcheck source=scripts/tpu/lib.sh
source "$(dirname "$0")/lib.sh"

WORKER=0
LINES=100
FOLLOW=1
while [[ $# -gt 0 ]]; do
  if take_common "$@"; then shift "$SHIFT"; continue; fi
  case "$1" in
    --worker) WORKER="${2:?}"; shift 2 ;;
    --worker=*) WORKER="${1#*=}"; shift ;;
    --lines) LINES="${2:?}"; shift 2 ;;
    --lines=*) LINES="${1#*=}"; shift ;;
    --no-follow) FOLLOW=0; shift ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
require_common
location_flags

tail_flags="-n $LINES"
if [[ "$FOLLOW" == 1 ]]; then
  tail_flags+=" -F"
fi
run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker="$WORKER" \
  --command="tail $tail_flags ~/jaxpost-train.log"
