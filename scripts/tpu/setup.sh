#!/usr/bin/env bash
# Installs jaxpost (this checkout's committed HEAD) with the TPU requirements on every
# worker of a TPU VM, into ~/jaxpost.
#
#   scripts/tpu/setup.sh --name NAME --zone ZONE [--ref REF] [--mount-bucket BUCKET]
#       [--project P] [--dry-run]
#
#   --ref            the git revision to install (default HEAD; uncommitted changes are
#                    not copied)
#   --mount-bucket   mount gs://BUCKET at /mnt/BUCKET on every worker with gcsfuse (must
#                    be installed on the image): a multi-host run's workdir must be a
#                    folder every worker sees, e.g. /mnt/BUCKET/runs/NAME
#   --dry-run        print the gcloud commands only

set -euo pipefail
# shellcheck source=scripts/tpu/lib.sh
source "$(dirname "$0")/lib.sh"

REF="HEAD"
BUCKET=""
while [[ $# -gt 0 ]]; do
  if take_common "$@"; then shift "$SHIFT"; continue; fi
  case "$1" in
    --ref) REF="${2:?}"; shift 2 ;;
    --ref=*) REF="${1#*=}"; shift ;;
    --mount-bucket) BUCKET="${2:?}"; shift 2 ;;
    --mount-bucket=*) BUCKET="${1#*=}"; shift ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
require_common
location_flags

root="$(cd "$(dirname "$0")/../.." && pwd)"
archive="${TMPDIR:-/tmp}/jaxpost-$NAME.tar.gz"
run git -C "$root" archive --format=tar.gz --prefix=jaxpost/ -o "$archive" "$REF"
run gcloud compute tpus tpu-vm scp "$archive" "$NAME:jaxpost.tar.gz" "${LOCATION[@]}" \
  --worker=all
install='rm -rf ~/jaxpost && tar -xzf ~/jaxpost.tar.gz -C ~ && cd ~/jaxpost'
install+=' && python3 -m pip install --upgrade pip -q && python3 -m pip install -r requirements-tpu.txt'
# Import only: touching the TPU here would wait for the other hosts of the slice.
install+=" && python3 -c 'import jax, jaxpost.train.common; print(\"jax\", jax.__version__)'"
run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=all --command="$install"
if [[ -n "$BUCKET" ]]; then
  mount="command -v gcsfuse >/dev/null || { echo 'gcsfuse is not installed on this image' >&2; exit 1; }"
  mount+=" && sudo mkdir -p /mnt/$BUCKET && sudo chown \$USER /mnt/$BUCKET"
  mount+=" && (mountpoint -q /mnt/$BUCKET || gcsfuse --implicit-dirs $BUCKET /mnt/$BUCKET)"
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=all --command="$mount"
fi
