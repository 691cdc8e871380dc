#!/usr/bin/env bash
# Starts the same `python -m jaxpost.train` command on every worker of a TPU VM (in the
# background, logging to ~/jaxpost-train.log on each), as one multi-host run.
#
#   scripts/tpu/launch.sh --name NAME --zone ZONE --config configs/NAME.py
#       --workdir DIR [--project P] [--dry-run] [-- --config.KEY=VALUE ...]
#
#   --config    the recipe, relative to ~/jaxpost on the workers
#   --workdir   the run folder; with several workers it must be shared by all of them
#               (setup.sh --mount-bucket), since every process writes its checkpoint shards
#   --          further arguments go to jaxpost.train unchanged
# Every worker runs with --config.distributed.enabled=True: jax.distributed.initialize()
# finds the coordinator (worker 0), the process count and this worker's index from the
# TPU VM's metadata; JAX_PLATFORMS=tpu makes a missing TPU an error, not a CPU run.

set -euo pipefail
# shellcheck source=scripts/tpu/lib.sh
source "$(dirname "$0")/lib.sh"

CONFIG=""
WORKDIR=""
EXTRA=()
while [[ $# -gt 0 ]]; do
  if [[ "$1" == "--" ]]; then shift; EXTRA=("$@"); break; fi
  if take_common "$@"; then shift "$SHIFT"; continue; fi
  case "$1" in
    --config) CONFIG="${2:?}"; shift 2 ;;
    --config=*) CONFIG="${1#*=}"; shift ;;
    --workdir) WORKDIR="${2:?}"; shift 2 ;;
    --workdir=*) WORKDIR="${1#*=}"; shift ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
require_common
[[ -n "$CONFIG" ]] || die "--config is required, e.g. configs/sft_demo.py"
[[ -n "$WORKDIR" ]] || die "--workdir is required, e.g. /mnt/BUCKET/runs/$NAME"
location_flags

train=(env JAX_PLATFORMS=tpu python3 -m jaxpost.train "--config=$CONFIG"
       "--config.workdir=$WORKDIR" --config.distributed.enabled=True "${EXTRA[@]}")
quoted="$(printf ' %q' "${train[@]}")"
command="cd ~/jaxpost && nohup${quoted} > ~/jaxpost-train.log 2>&1 < /dev/null &"
run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=all --command="$command"
echo "started on every worker of $NAME; follow with: scripts/tpu/logs.sh --name $NAME --zone $ZONE"
