# shellcheck shell=bash
# Shared by the scripts/tpu/*.sh commands: option parsing helpers and `run`, which prints
# a gcloud command (shell-quoted) and, unless --dry-run, runs it.

DRY_RUN=0
NAME="${JAXPOST_TPU_NAME:-}"
ZONE="${JAXPOST_TPU_ZONE:-}"
PROJECT="${JAXPOST_TPU_PROJECT:-}"

die() {
  echo "error: $*" >&2
  exit 2
}

# The script's header comment (from line 2 to the first blank line) as its --help.
usage() {
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
}

# `take_common OPTION VALUE`: consumes the options every command has; returns 1 if
# OPTION is not one of them (the caller handles it), and sets SHIFT to the count used.
# shellcheck disable=SC2034  # SHIFT is read by the scripts that source this file
take_common() {
  SHIFT=1
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --name) NAME="${2:?--name needs a value}"; SHIFT=2 ;;
    --name=*) NAME="${1#*=}" ;;
    --zone) ZONE="${2:?--zone needs a value}"; SHIFT=2 ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project) PROJECT="${2:?--project needs a value}"; SHIFT=2 ;;
    --project=*) PROJECT="${1#*=}" ;;
    -h|--help) usage; exit 0 ;;
    *) return 1 ;;
  esac
}

require_common() {
  [[ -n "$NAME" ]] || die "--name is required (or set JAXPOST_TPU_NAME)"
  [[ -n "$ZONE" ]] || die "--zone is required (or set JAXPOST_TPU_ZONE), e.g. us-central2-b"
}

# The flags every gcloud call gets.
location_flags() {
  LOCATION=(--zone="$ZONE")
  if [[ -n "$PROJECT" ]]; then
    LOCATION+=(--project="$PROJECT")
  fi
}

run() {
  local arg line="+"
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      line+=" $arg"
    else
      line+=" ${arg@Q}"
    fi
  done
  echo "$line"
  if [[ "$DRY_RUN" == 0 ]]; then
    "$@"
  fi
}
