# Sourced by scripts/dev.sh, scripts/setup.sh and scripts/test.sh (not run):
# the project's own virtualenv, so nothing is installed into the system
# python (Debian 12's /usr/bin/python3 refuses `pip install` with
# externally-managed-environment, PEP 668).
#
#   csi_spdk_venv [EXTRAS]    create .venv when missing (with the Debian
#                             python; installs python3-venv when absent), then
#                             `pip install -e .[EXTRAS]` unless the stamp says
#                             this pyproject.toml was already installed with
#                             these extras. Puts .venv/bin first on PATH.
#
# Env: CSI_SPDK_VENV (default <repo>/.venv), CSI_SPDK_PYTHON (the interpreter
# the venv is made from; default /usr/bin/python3, else python3 on PATH).

csi_spdk_venv() {
  local extras="${1:-}" repo venv base stamp want have
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  venv="${CSI_SPDK_VENV:-$repo/.venv}"
  base="${CSI_SPDK_PYTHON:-}"
  if [ -z "$base" ]; then
    if [ -x /usr/bin/python3 ]; then base=/usr/bin/python3; else base="$(command -v python3)"; fi
  fi
  [ -n "$base" ] || { echo "csi-spdk: no python3 found; install it: apt-get install python3" >&2; return 1; }

  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import sys' 2>/dev/null; then
    echo "venv: creating $venv with $base ($("$base" --version 2>&1))" >&2
    rm -rf "$venv"
    if ! "$base" -m venv "$venv" 2>/dev/null; then
      # Debian splits venv/ensurepip into python3-venv.
      rm -rf "$venv"
      local sudo=""
      [ "$(id -u)" = 0 ] || sudo="sudo"
      echo "venv: $base has no venv module; apt-get install python3-venv" >&2
      $sudo apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        python3-venv >/dev/null
      "$base" -m venv "$venv"
    fi
  fi

  # The stamp: pyproject.toml's hash and the extras it was installed with.
  stamp="$venv/.csi-spdk-installed"
  want="$(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1) $repo [${extras}]"
  have="$(cat "$stamp" 2>/dev/null || true)"
  # An install with the test extras also serves a plain one (dev.sh after setup.sh).
  if [ "$have" != "$want" ] && ! { [ -z "$extras" ] && [ "${have% *}" = "${want% *}" ]; }; then
    echo "venv: pip install -e .${extras:+[$extras]} into $venv" >&2
    local start=$SECONDS
    # PIP_* from the caller's environment (e.g. PIP_USER) must not leak in.
    env -u PIP_USER -u PIP_TARGET -u PIP_PREFIX "$venv/bin/python" -m pip install -q \
      --disable-pip-version-check -e "$repo${extras:+[$extras]}"
    echo "$want" > "$stamp"
    echo "venv: installed in $((SECONDS - start))s" >&2
  fi
  export VIRTUAL_ENV="$venv"
  export PATH="$venv/bin:$PATH"
  export PYTHON="$venv/bin/python"
}
