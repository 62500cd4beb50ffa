#!/usr/bin/env bash
# Install PyTorch into a venv FIRST, from the right place (called by `make install`).
#
#   tools/install_torch.sh PYTHON [--dry-run]
#
#   TORCH_SPEC    what to install; default torch==<the torch pin in constraints.txt>
#   TORCH_INDEX   where from: auto (default) | pypi | an index URL, added as pip's --extra-index-url
#   TORCH_CONSTRAINTS  a pip constraints file for torch's own dependencies (make install: constraints.txt minus torch)
#   TORCH_UV      path to a uv binary (make install: the venv's): a local wheel is installed with it (7 s against 45 s
#                 for pip unpacking the 200 MB wheel, measured here, same packages); pip when uv fails or is absent
#
# auto:
#   Linux x86_64  a local wheel that satisfies TORCH_SPEC (pip's find-links, as on the course machines) wins and needs
#                 no network; otherwise PyTorch's CPU wheel index https://download.pytorch.org/whl/cpu (~200 MB).
#                 PyPI's own Linux x86_64 torch is the CUDA build (several GB with its nvidia-* wheels): the CPU
#                 index's 2.13.0+cpu sorts above PyPI's 2.13.0, so pip takes the CPU build.
#   otherwise     PyPI's default wheel (macOS: CPU + Apple MPS, ~80 MB).
# A CUDA build only when asked: TORCH_INDEX=https://download.pytorch.org/whl/cu128 (or TORCH_INDEX=pypi on Linux).
# --dry-run passes --dry-run to pip: resolves and reports, installs nothing.
set -euo pipefail

py="${1:?usage: tools/install_torch.sh PYTHON [--dry-run]}"
dry=()
if [ "${2:-}" = --dry-run ]; then dry=(--dry-run); fi

cpu_index=https://download.pytorch.org/whl/cpu
repo="$(cd "$(dirname "$0")/.." && pwd)"
pin="$(sed -n 's/^torch==\([^ ;#]*\).*/\1/p' "$repo/constraints.txt" | head -n 1)"
default_spec="torch==${pin:-2.13.0}"
spec="${TORCH_SPEC:-$default_spec}"
index="${TORCH_INDEX:-auto}"

if [ "$index" = auto ]; then
    if [ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ]; then
        if "$py" -m pip install --dry-run --no-index --no-deps --quiet "$spec" >/dev/null 2>&1; then
            index=local
        else
            index="$cpu_index"
        fi
    else
        index=pypi
    fi
fi

case "$index" in
    local) echo "torch: $spec from a wheel on this machine (pip's find-links)"; extra=() ;;
    pypi)  echo "torch: $spec from PyPI's default wheels"; extra=() ;;
    *)     echo "torch: $spec from $index (extra index)"; extra=(--extra-index-url "$index") ;;
esac

cons=()
if [ -n "${TORCH_CONSTRAINTS:-}" ]; then cons=(-c "$TORCH_CONSTRAINTS"); fi

# A local wheel: uv, given pip's find-links (uv does not read pip's configuration). Only here: the CPU index is
# installed by pip, whose extra-index resolution is the one documented above.
if [ "$index" = local ] && [ ${#dry[@]} -eq 0 ] && [ -n "${TORCH_UV:-}" ] && [ -x "$TORCH_UV" ]; then
    links="${PIP_FIND_LINKS:-$("$py" -m pip config get global.find-links 2>/dev/null || true)}"
    uv_links=()
    for l in $links; do uv_links+=(--find-links "$l"); done
    if "$TORCH_UV" pip install --python "$py" "${uv_links[@]}" "${cons[@]}" "$spec"; then
        exit 0
    fi
    echo "torch: uv could not install the local wheel (its message is above); pip instead"
fi

if ! "$py" -m pip install "${dry[@]}" "${extra[@]}" "${cons[@]}" "$spec"; then
    {
        echo
        echo "make install: pip could not install TORCH_SPEC='$spec' (TORCH_INDEX=$index); pip's message is above."
        echo "Overrides:"
        echo "    make install TORCH_SPEC='$default_spec'                     # the pinned version (CPU build on Linux x86_64)"
        echo "    make install TORCH_SPEC='torch==X.Y.Z'                      # another release"
        echo "    make install TORCH_INDEX=https://download.pytorch.org/whl/cu128   # a CUDA build (several GB)"
        echo "    make install TORCH_INDEX=pypi                               # PyPI's default wheel"
    } >&2
    exit 1
fi
