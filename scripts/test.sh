#!/usr/bin/env bash
# Installs what the tests need (Mesa's lavapipe Vulkan driver, so the wgpu kernels really run
# without a GPU) and runs the whole test suite with the GPU required.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 || ! ldconfig -p | grep -q libvulkan.so.1; then
    echo "installing mesa-vulkan-drivers and libvulkan1 (lavapipe software Vulkan)" >&2
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo -n"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
fi

# The NAT test builds network namespaces with NAT routers: `ip` (iproute2) and `nft`
# (nftables). As root it must run, not skip.
if [ "$(id -u)" -eq 0 ]; then
    if ! command -v nft >/dev/null 2>&1 || ! command -v ip >/dev/null 2>&1; then
        echo "installing iproute2 and nftables (the NAT test's routers)" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 nftables >/dev/null
    fi
    export CORVID_REQUIRE_NETNS=1
    # The status page is checked in a real browser: Debian's headless Chromium.
    if ! command -v chromium >/dev/null 2>&1; then
        echo "installing chromium (the status page's browser test)" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    fi
    export CORVID_REQUIRE_BROWSER=1
fi

# Kernel tests fail, rather than skip, when no Vulkan adapter is found.
export CORVID_REQUIRE_GPU=1
# Mesa's WSI warns on every device open without it.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

cargo test --workspace --all-features "$@"

# The Python SDK, built by its documented install command (`pip install ./python`) into a
# fresh virtual environment (the dev profile here: the tests need it built, not fast), then
# its pytest suite. Arguments to this script filter the Rust tests only.
if [ "$#" -eq 0 ]; then
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        echo "installing python3-venv and python3-pip (the Python SDK's tests)" >&2
        sudo=""
        if [ "$(id -u)" -ne 0 ]; then sudo="sudo -n"; fi
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv python3-pip >/dev/null
    fi
    # maturin builds from python/: a relative target directory must not resolve there.
    if [ -n "${CARGO_TARGET_DIR:-}" ]; then
        mkdir -p "$CARGO_TARGET_DIR"
        CARGO_TARGET_DIR=$(realpath "$CARGO_TARGET_DIR")
        export CARGO_TARGET_DIR
    fi
    target="${CARGO_TARGET_DIR:-$PWD/target}"
    venv="$target/python-venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check numpy pytest scikit-learn
    MATURIN_PEP517_ARGS="--profile dev" "$venv/bin/pip" install -q --disable-pip-version-check ./python
    # From the top: in python/ the source package (without its extension) would shadow the
    # installed one. The node-process tests run the `corvid` binary the Rust tests built.
    # They take well under a minute; a hang (a deadlock once) fails in 10 minutes instead of
    # eating the whole CI budget.
    CORVID_BIN="${CORVID_BIN:-$target/debug/corvid}" \
        timeout --kill-after=10 600 "$venv/bin/python" -m pytest -q -p no:cacheprovider python/tests
fi
