#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/: resources/fuzz.sh SECONDS [TARGET...]
# (all targets if none is named). Installs cargo-fuzz if missing, builds
# the targets with the nightly toolchain (build output goes to a log that
# is shown only on failure), replays the saved reproducers in
# fuzz/regressions/TARGET/, then fuzzes each target for SECONDS starting
# from fuzz/corpus/TARGET/ (new finds go to a scratch directory; the kept
# corpus is not changed). Prints the executions and exec/s of each target.
# Exits non-zero on any crash, timeout (hang) or leak, naming the artifact.
# FUZZ_JOBS=N runs N libFuzzer processes per target side by side (sharing
# the scratch corpus) and adds up their executions: for a machine with
# many cores. FUZZ_SANITIZER=none builds without AddressSanitizer (about
# 1.7x the executions per second; the code fuzzed has no unsafe of its
# own, so long campaigns may trade ASan for executions; the default and
# the test command's smoke run keep it).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: $0 SECONDS [TARGET...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
seconds=$1
shift
[[ "$seconds" =~ ^[0-9]+$ ]] || usage

# Each run: a hang longer than this is a finding.
timeout_s=${FUZZ_TIMEOUT:-10}
jobs=${FUZZ_JOBS:-1}
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || usage
sanitizer=${FUZZ_SANITIZER:-address}
case "$sanitizer" in
    address | none) ;;
    *) echo "fuzz: FUZZ_SANITIZER must be address or none" >&2; exit 2 ;;
esac
root=$PWD
log_dir=${FUZZ_LOG_DIR:-$(mktemp -d /tmp/xskvm-fuzz.XXXXXX)}
mkdir -p "$log_dir"
log_dir=$(cd "$log_dir" && pwd)

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: the nightly toolchain is needed (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz (log: $log_dir/install.log)"
    cargo install cargo-fuzz --locked >"$log_dir/install.log" 2>&1 \
        || { tail -50 "$log_dir/install.log" >&2; echo "fuzz: installing cargo-fuzz failed" >&2; exit 1; }
fi

if [ $# -eq 0 ]; then
    set -- $(cargo fuzz list)
fi

echo "== building fuzz targets, sanitizer $sanitizer (log: $log_dir/build.log)"
for target in "$@"; do
    # Release with debug assertions (cargo-fuzz's default): overflow checks on.
    if ! cargo +nightly fuzz build -s "$sanitizer" "$target" >>"$log_dir/build.log" 2>&1; then
        tail -80 "$log_dir/build.log" >&2
        echo "fuzz: building fuzz target $target failed" >&2
        exit 1
    fi
done
triple=$(rustc +nightly -vV | sed -n 's/^host: //p')
bin_dir=fuzz/target/$triple/release

failed=0
for target in "$@"; do
    bin=$bin_dir/$target
    artifacts=$root/fuzz/artifacts/$target/
    mkdir -p "$artifacts"
    log=$log_dir/$target.log
    common=(-timeout="$timeout_s" -artifact_prefix="$artifacts")
    # FUZZ_SEED: a fixed libFuzzer seed, so that a smoke run mutates the
    # same way each time (the test command sets it; long runs leave it out).
    if [ -n "${FUZZ_SEED:-}" ]; then
        common+=(-seed="$FUZZ_SEED")
    fi

    # Bugs found before must stay fixed.
    if [ -d "fuzz/regressions/$target" ] && [ -n "$(ls -A "fuzz/regressions/$target")" ]; then
        if ! "$bin" "${common[@]}" fuzz/regressions/"$target"/* >"$log_dir/$target.regressions.log" 2>&1; then
            tail -40 "$log_dir/$target.regressions.log" >&2
            echo "fuzz: $target: a saved reproducer in fuzz/regressions/$target fails again" >&2
            failed=1
            continue
        fi
    fi

    scratch=$log_dir/corpus-$target
    jobs_dir=
    mkdir -p "$scratch" "fuzz/corpus/$target"
    rc=0
    if [ "$jobs" -gt 1 ]; then
        # Each job logs to fuzz-K.log in the working directory.
        jobs_dir=$log_dir/jobs-$target
        mkdir -p "$jobs_dir"
        (cd "$jobs_dir" && "$root/$bin" "${common[@]}" -jobs="$jobs" -workers="$jobs" \
            -max_total_time="$seconds" -print_final_stats=1 \
            "$scratch" "$root/fuzz/corpus/$target") >"$log" 2>&1 || rc=$?
        # libFuzzer copies each finished job's log into its own output, so
        # the executions are summed over the job logs alone (summing $log
        # too counted every job twice). No job log at all: rc says why.
        execs=$(cat "$jobs_dir"/fuzz-*.log 2>/dev/null \
            | sed -n 's/^stat::number_of_executed_units: *//p' | awk '{s += $1} END {print s}')
        rate=$(( ${execs:-0} / (seconds > 0 ? seconds : 1) ))
    else
        "$bin" "${common[@]}" -max_total_time="$seconds" -print_final_stats=1 \
            "$scratch" "fuzz/corpus/$target" >"$log" 2>&1 || rc=$?
        execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
        rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    fi
    if [ "$rc" -ne 0 ]; then
        tail -60 "$log" >&2
        artifact=$(cat "$log" ${jobs_dir:+"$jobs_dir"/fuzz-*.log} 2>/dev/null \
            | sed -n 's/.*Test unit written to \(.*\)$/\1/p' | tail -1)
        echo "fuzz: $target FAILED (exit $rc) after ${execs:-?} executions; artifact: ${artifact:-none (see $log)}" >&2
        echo "fuzz: reproduce with: $bin $artifact" >&2
        failed=1
        continue
    fi
    printf '%-16s %12s executions in %ss, %s exec/s\n' "$target" "${execs:-?}" "$seconds" "${rate:-?}"
done
exit $failed
