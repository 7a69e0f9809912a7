#!/usr/bin/env bash
# Install what `python -m bench` (`make bench`) needs, when missing: Debian's nginx (the
# upstream), wrk (the load) and taskset.
# Both come from Debian's own archive; nothing else is downloaded. The nginx package's service is
# NOT started: the benchmark runs its own nginx on a loopback port with a generated config.
set -euo pipefail

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
if [ ${#need[@]} -eq 0 ]; then
  echo "bench/setup.sh: nginx, wrk and taskset are already installed"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

echo "bench/setup.sh: installing ${need[*]}"
$SUDO apt-get update -qq
for pkg in "${need[@]}"; do
  if ! apt-cache show "$pkg" >/dev/null 2>&1; then
    echo "bench/setup.sh: package $pkg is not in the apt sources" >&2
  fi
done
available=()
for pkg in "${need[@]}"; do apt-cache show "$pkg" >/dev/null 2>&1 && available+=("$pkg"); done
[ ${#available[@]} -eq 0 ] && exit 0

# Keep the package from starting a system nginx on port 80: a policy-rc.d that refuses every
# service start, only for the duration of the install, and only if the machine has none.
cleanup=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod +x /usr/sbin/policy-rc.d
  cleanup="/usr/sbin/policy-rc.d"
fi
trap '[ -n "$cleanup" ] && $SUDO rm -f "$cleanup"' EXIT
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${available[@]}"
echo "bench/setup.sh: done"
