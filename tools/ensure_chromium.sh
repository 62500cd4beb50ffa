#!/usr/bin/env bash
# Make sure the browser the real-browser tests drive (Debian's Chromium) is installed, before any test runs.
#
#   tools/ensure_chromium.sh [--dry-run]
#
# * Chromium present (CHROMIUM, default /usr/bin/chromium, is executable): nothing to do.
# * Missing, running as root: installs it with apt (DEBIAN_FRONTEND=noninteractive):
#       apt-get update && apt-get install -y chromium chromium-driver
# * Missing, not root but password-less sudo works: the same through `sudo -n`.
# * Missing otherwise (or no apt-get): exits 1 before any test, naming the browser and the exact command to run.
#
# --dry-run prints what it would run instead of running it (exit 0 where it would install).
# Overridable for tests, so that the logic can be checked without uninstalling anything:
#   CHROMIUM=/path/to/chromium    the browser to look for
#   CHROMIUM_UID=1000             the user id to act as (default: `id -u`)
#   CHROMIUM_SUDO=none            pretend there is no usable sudo (default: auto-detect `sudo -n true`)
set -euo pipefail

dry_run=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run=1 ;;
        *) echo "ensure_chromium.sh: unknown argument '$arg'; allowed: --dry-run" >&2; exit 2 ;;
    esac
done

chromium="${CHROMIUM:-/usr/bin/chromium}"
uid="${CHROMIUM_UID:-$(id -u)}"
packages="chromium chromium-driver"
cmd="apt-get update && apt-get install -y $packages"

if [ -x "$chromium" ]; then
    echo "chromium: $chromium found"
    exit 0
fi

if [ "$uid" -eq 0 ]; then
    sudo=""
elif [ "${CHROMIUM_SUDO:-auto}" != none ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo="sudo -n "
else
    {
        echo "make test: the real-browser tests need Chromium at $chromium, and it is missing."
        echo "Installing it needs root (apt), and this user (uid $uid) is not root and has no password-less sudo."
        echo "Run this as root (Debian/Ubuntu), then run make test again:"
        echo
        echo "    $cmd"
        echo
        echo "(with sudo: sudo apt-get update && sudo apt-get install -y $packages)"
    } >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "make test: Chromium is missing at $chromium and there is no apt-get on this machine;" \
         "install Chromium with your system's package manager (Debian/Ubuntu: $cmd)." >&2
    exit 1
fi

echo "chromium: $chromium is missing; installing it: ${sudo}apt-get update && ${sudo}apt-get install -y $packages"
if [ "$dry_run" -eq 1 ]; then
    echo "chromium: dry run, nothing installed"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
${sudo}apt-get update
${sudo}apt-get install -y $packages

if [ ! -x "$chromium" ]; then
    echo "make test: apt installed '$packages' but $chromium is still missing (on Ubuntu, apt's chromium is a snap" \
         "stub); install a Chromium that provides $chromium, then run make test again." >&2
    exit 1
fi
echo "chromium: installed $chromium"
