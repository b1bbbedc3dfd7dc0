#!/usr/bin/env bash
# The GPU run: install the carried wheels (bench/gpu/wheels, from prepare.sh) into a temporary site
# folder, then run bench/gpu/checks.py, which writes each check's JSON into $OUT as soon as it ends.
#
#   On the GPU machine, from the repository root (the device tool's `run`, carrying bench/gpu/wheels):
#       bash bench/gpu/run.sh
#   Here, before a GPU is lent: the same steps with the tiny model on the CPU, torch 2.11 and the image's
#   packages (bench/gpu/image-packages.txt) in a throw-away Python 3.12 venv, plus exactly the wheel set:
#       bench/gpu/run.sh --dry-run [--venv DIR]      (--venv: keep and reuse that venv)
#
# Other arguments go to checks.py: --budget-s S, --blocks N, --only NAME,...  See bench/README.md.
set -uo pipefail
cd "$(dirname "$0")/../.."
started=$(date +%s)

dry_run=0
venv=""
args=()
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) dry_run=1 ;;
        --venv) venv=$2; shift ;;
        *) args+=("$1") ;;
    esac
    shift
done

shopt -s nullglob
wheels=(bench/gpu/wheels/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    echo "run.sh: no wheels in bench/gpu/wheels: run bench/gpu/prepare.sh here, and carry bench/gpu/wheels" >&2
    exit 2
fi

python=${PYTHON:-python3}
scratch=$(mktemp -d "${TMPDIR:-/tmp}/slapgen-gpu-run.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
mode=()
if [ $dry_run = 1 ]; then
    py312=${PYTHON312:-}
    if [ -z "$py312" ]; then
        if python3.12 --version >/dev/null 2>&1; then
            py312=python3.12
        else
            for candidate in "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.12*/bin/python3.12; do
                py312=$candidate
            done
        fi
    fi
    if [ -z "$py312" ]; then
        echo "run.sh: the dry run needs Python 3.12 (the GPU machine's); set PYTHON312" >&2
        exit 2
    fi
    venv=${venv:-$scratch/venv}
    if [ ! -x "$venv/bin/python" ]; then
        echo "run.sh: building the stand-in for the GPU image in $venv (torch 2.11.0 and bench/gpu/image-packages.txt)"
        "$py312" -m venv "$venv" && "$venv/bin/python" -m pip install -q -r bench/gpu/image-packages.txt || exit 1
    fi
    # The wheel set alone must provide its packages: drop any the image packages pulled in (typer pulls
    # pydantic). typing-extensions stays: torch needs it, and the GPU image has it too.
    carried=$(grep -E '^[A-Za-z]' bench/gpu/requirements.txt | sed 's/[=<>].*//' | grep -vx typing-extensions)
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip uninstall -y -q $carried 2>/dev/null
    python=$venv/bin/python
    OUT=${OUT:-bench/results/runs/gpu-dry-run-$(date +%Y%m%d-%H%M%S)}
    mode=(--dry-run --budget-s 1800)
fi
OUT=${OUT:-$scratch/out}
mkdir -p "$OUT"

echo "run.sh: installing ${#wheels[@]} wheels with $python"
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$scratch/site" "${wheels[@]}" || exit 1
export PYTHONPATH="$scratch/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$python" bench/gpu/checks.py --out "$OUT" "${mode[@]}" "${args[@]}"
rc=$?
echo "run.sh: $(( $(date +%s) - started )) s in all; checks exit $rc; results in $OUT"
exit $rc
