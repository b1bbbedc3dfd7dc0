#!/usr/bin/env bash
# Download the wheels the GPU machine lacks (bench/gpu/requirements.txt) for its Python 3.12 on
# manylinux x86-64 into bench/gpu/wheels/ (git-ignored), then check their total size: the device
# tool carries at most 64 MiB per run, working tree included. Run here, where PyPI is reachable.
#
#   bench/gpu/prepare.sh              download (replaces bench/gpu/wheels/), print sizes, check
#   bench/gpu/prepare.sh --check DIR  only the size check, on the wheels in DIR
#
# SLAP_WHEELS_LIMIT_MIB (default 56) is the cap: the working tree is about 3 MiB of the 64.
set -euo pipefail
cd "$(dirname "$0")/../.."

requirements=bench/gpu/requirements.txt
wheels=bench/gpu/wheels
limit_mib=${SLAP_WHEELS_LIMIT_MIB:-56}

check_size() {
    local dir=$1 total
    shopt -s nullglob
    local files=("$dir"/*.whl)
    if [ ${#files[@]} -eq 0 ]; then
        echo "prepare.sh: no wheels in $dir" >&2
        return 1
    fi
    for file in "${files[@]}"; do
        stat -c '%s %n' "$file" | awk '{printf "%8.2f MiB  %s\n", $1 / 1048576, substr($0, index($0, " ") + 1)}'
    done
    total=$(stat -c %s "${files[@]}" | awk '{s += $1} END {print s}')
    awk -v t="$total" -v n=${#files[@]} -v cap="$limit_mib" 'BEGIN {printf "%8.2f MiB  total (%d wheels; cap %s MiB)\n", t / 1048576, n, cap}'
    if [ "$total" -gt $((limit_mib * 1048576)) ]; then
        echo "prepare.sh: the wheels take more than $limit_mib MiB; the device tool carries 64 MiB in all" >&2
        return 1
    fi
}

if [ "${1:-}" = "--check" ]; then
    check_size "${2:-$wheels}"
    exit
fi

staging=$(mktemp -d "${TMPDIR:-/tmp}/slapgen-wheels.XXXXXX")
trap 'rm -rf "$staging"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 \
    -d "$staging" -r "$requirements"

# One wheel per requirement, no more: two versions of one package stop the install there.
expected=$(grep -cE '^[A-Za-z]' "$requirements")
got=$(find "$staging" -name '*.whl' | wc -l)
if [ "$got" -ne "$expected" ]; then
    echo "prepare.sh: expected $expected wheels, got $got:" >&2
    ls "$staging" >&2
    exit 1
fi
check_size "$staging"
rm -rf "$wheels"
mkdir -p "$(dirname "$wheels")"
mv "$staging" "$wheels"
trap - EXIT
echo "wrote $wheels"
