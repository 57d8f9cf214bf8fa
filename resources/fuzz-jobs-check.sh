#!/usr/bin/env bash
# Checks resources/fuzz.sh's FUZZ_JOBS arithmetic: with several libFuzzer
# jobs, the executions it reports are the sum of what each job says it ran
# (its final stats), neither more nor less. A short run of net_option (the
# fastest target). Exits non-zero, saying why, when they differ.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-5}
dir=$(mktemp -d /tmp/xskvm-fuzz-jobs.XXXXXX)
trap 'rm -rf "$dir"' EXIT
out=$(FUZZ_JOBS=2 FUZZ_SEED=1 FUZZ_LOG_DIR="$dir" bash resources/fuzz.sh "$seconds" net_option)
echo "$out"
reported=$(echo "$out" | awk '$1 == "net_option" && $3 == "executions" {print $2}')
logs=("$dir"/jobs-net_option/fuzz-*.log)
[ "${#logs[@]}" -eq 2 ] || { echo "fuzz-jobs-check: expected 2 job logs, found ${#logs[@]}" >&2; exit 1; }
actual=$(cat "${logs[@]}" | sed -n 's/^stat::number_of_executed_units: *//p' | awk '{s += $1; n++} END {if (n == 2) print s}')
if [ -z "$reported" ] || [ -z "$actual" ] || [ "$reported" -le 0 ] || [ "$reported" -ne "$actual" ]; then
    echo "fuzz-jobs-check: fuzz.sh reported ${reported:-nothing} executions; its two jobs ran ${actual:-an unknown number}" >&2
    exit 1
fi
echo "fuzz-jobs-check: fuzz.sh's count ($reported) is the sum of its jobs' executions"
