#!/usr/bin/env bash
# Runs every xskvm test on a fresh Debian bookworm machine (as root):
# installs what is missing, builds the guest image, then `cargo test` for
# the whole workspace — unit and device tests, AF_XDP tests on veth pairs,
# and boot tests (directly with hardware virtualization, else in the nested
# test host).
set -euo pipefail
cd "$(dirname "$0")/.."

bash resources/install-deps.sh > /tmp/xskvm-install-deps.log 2>&1 \
    || { cat /tmp/xskvm-install-deps.log >&2; echo "test: installing packages failed" >&2; exit 1; }
command -v cargo >/dev/null || { echo "test: cargo not found (install Rust with rustup)" >&2; exit 1; }

echo "== guest image"
bash resources/guest-image.sh
if grep -qwE 'vmx|svm' /proc/cpuinfo && [ -c /dev/kvm ]; then
    echo "== boot tests will run directly (this host has hardware virtualization)"
else
    echo "== boot tests will run in the nested test host (QEMU TCG with an emulated AMD SVM CPU)"
fi

echo "== cargo test"
cargo test --workspace --all-targets "$@"

# Fuzzing smoke run (issue 8): every cargo-fuzz target for a short while
# from its kept corpus, plus the saved reproducers; a crash, hang or leak
# fails here with the artifact's path. Installs cargo-fuzz when missing.
echo "== fuzz smoke (${FUZZ_SMOKE_SECONDS:-20} s per target)"
FUZZ_SEED=${FUZZ_SEED:-1} bash resources/fuzz.sh "${FUZZ_SMOKE_SECONDS:-20}"
# The campaign numbers on issue 8 come from fuzz.sh's counts: check its
# FUZZ_JOBS sum against what the jobs themselves report.
echo "== fuzz.sh job count check"
bash resources/fuzz-jobs-check.sh 5
