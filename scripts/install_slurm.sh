#!/usr/bin/env bash
# Install a local Slurm (controller, node daemon, client) and munge, if they are missing.
#
# Idempotent: exits 0 immediately when slurmctld, slurmd, munged and sbatch are all on PATH.
# Otherwise it needs root and apt-get (Debian/Ubuntu); it installs Debian's packages without
# recommends (~15 s on Debian 12). Exits non-zero with a one-line reason when it cannot install;
# tests/test_slurm.py calls it and skips with that reason.
set -euo pipefail

need=(slurmctld slurmd munged sbatch scontrol sinfo)

missing() {
    local tool
    for tool in "${need[@]}"; do
        # the daemons live in /usr/sbin, which may not be on a non-login PATH
        if ! command -v "$tool" >/dev/null 2>&1 && [[ ! -x "/usr/sbin/$tool" ]]; then
            return 0
        fi
    done
    return 1
}

if ! missing; then
    echo "install_slurm: slurm and munge already installed"
    exit 0
fi

if [[ "$(id -u)" -ne 0 ]]; then
    echo "install_slurm: slurm/munge missing and not running as root; cannot install" >&2
    exit 2
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_slurm: slurm/munge missing and apt-get is not available; install slurmctld, slurmd, slurm-client and munge by hand" >&2
    exit 3
fi

export DEBIAN_FRONTEND=noninteractive
packages=(slurmctld slurmd slurm-client munge)
install() {
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >/tmp/install_slurm.apt.log 2>&1
}

# Only refresh the package lists when the packages are not known yet (or the first install fails).
if ! apt-cache show slurmctld >/dev/null 2>&1 || ! install; then
    if ! apt-get update -qq >/tmp/install_slurm.update.log 2>&1; then
        echo "install_slurm: apt-get update failed (no package registry?): $(tail -n 3 /tmp/install_slurm.update.log | tr '\n' ' ')" >&2
        exit 4
    fi
    if ! install; then
        echo "install_slurm: apt-get install ${packages[*]} failed: $(tail -n 3 /tmp/install_slurm.apt.log | tr '\n' ' ')" >&2
        exit 5
    fi
fi

if missing; then
    echo "install_slurm: packages installed but a tool is still missing (need: ${need[*]})" >&2
    exit 6
fi
echo "install_slurm: installed ${packages[*]}"
