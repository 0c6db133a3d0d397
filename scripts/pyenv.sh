# shellcheck shell=bash
# pyenv DIR PACKAGE...: a Python virtual environment at DIR with these packages (pip-installed,
# reused by later runs). Debian without python3-venv (no ensurepip) gets a pip-less venv filled by
# the system pip (--python), which PEP 668 allows. Sourced by deploy/validate.sh and .ci/run.
pyenv() {
  local dir=$1
  shift
  if [ ! -x "$dir/bin/python" ]; then
    rm -rf "$dir"
    if ! python3 -m venv "$dir" >/dev/null 2>&1; then
      rm -rf "$dir"
      python3 -m venv --without-pip "$dir"
    fi
  fi
  if [ -x "$dir/bin/pip" ]; then
    "$dir/bin/python" -m pip install -q "$@"
  else
    python3 -m pip --python "$dir/bin/python" install -q "$@"
  fi
}
