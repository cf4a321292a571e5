#!/usr/bin/env bash
# Shared by the launchers (sourced): error exit, shell quoting, and echo-then-run for --dry-run.
# The sourcing script sets DRY_RUN (1: print commands only).

die() {
  echo "error: $*" >&2
  exit 2
}

# One word, single-quoted when it holds anything the shell would interpret.
shquote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# A command as one line that a shell reads back as the same words.
cmdline() {
  local out="" word
  for word in "$@"; do
    out+="$(shquote "$word") "
  done
  printf '%s' "${out% }"
}

# Echo a command with a "+ " prefix; run it unless --dry-run.
run() {
  echo "+ $(cmdline "$@")"
  if [[ "${DRY_RUN:-0}" -eq 0 ]]; then
    "$@"
  fi
}
