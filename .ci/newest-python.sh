#!/usr/bin/env bash
# Runs a command with Debian 13's Python 3.13 (where pip resolves the newest JAX), in a chroot built from
# Debian's package registry. This machine's own Python is 3.11, which pip caps at jax 0.10.x.
#
#   .ci/newest-python.sh 'pip install -e ".[dev]" && python -m pytest -q -x tests/test_run.py'
#
# .ci/run calls it from the repository root (job 2); it needs nothing outside the repository but root, apt's
# Debian mirror and PyPI. The command runs in a copy of the current directory (so the checkout is never written;
# .git, venvs and .ci-data are left out), inside a venv made
# with python3.13 (kept between calls in $ROOT/opt/venv). First call: ~2 min to build the root (measured: 1 min 49 s with the pip install); later: seconds.
# Needs root (debootstrap, chroot, mount). ROOT defaults to /tmp/py313-root.
set -euo pipefail
ROOT=${ROOT:-/tmp/py313-root}
CMD=${1:?usage: newest-python.sh 'command to run in a copy of this directory'}
if [ ! -x "$ROOT/usr/bin/python3.13" ]; then
  command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
  # The machine's own Debian mirror (the one apt uses), from deb822 or one-line sources.
  mirror=$(grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -1)
  [ -n "$mirror" ] || mirror=$(grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | grep -v security | head -1)
  [ -n "$mirror" ] || { echo "newest-python.sh: no Debian mirror found in apt's sources"; exit 1; }
  debootstrap --variant=minbase --include=python3.13,python3.13-venv,ca-certificates,git \
    trixie "$ROOT" "$mirror" >/tmp/newest-python-debootstrap.log 2>&1 \
    || { tail -5 /tmp/newest-python-debootstrap.log; exit 1; }
fi
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
[ -f /etc/pip.conf ] && cp /etc/pip.conf "$ROOT/etc/pip.conf"
mountpoint -q "$ROOT/proc" || mount --bind /proc "$ROOT/proc"
mountpoint -q "$ROOT/dev" || mount --bind /dev "$ROOT/dev"
[ -x "$ROOT/opt/venv/bin/python" ] || chroot "$ROOT" python3.13 -m venv /opt/venv
rm -rf "$ROOT/work" && mkdir -p "$ROOT/work" && tar --exclude=.git --exclude='*venv*' --exclude=.ci-data -cf - . | tar -xf - -C "$ROOT/work"
chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/opt/venv/bin:/usr/bin:/bin LANG=C.UTF-8 \
  PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 MTCL_DATA_DIR=/tmp/mtcl-data \
  /bin/bash -c "cd /work && $CMD"
