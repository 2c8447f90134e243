#!/usr/bin/env bash
# Kernel tests under a second Triton version (issue 18): the Triton interpreter on CPU, Triton 3.6.
#
# CI runs this after `make test` (which builds ./.venv with Triton 3.9 and runs every test there).
# By hand, from anywhere:
#   make setup && .ci/triton_versions.sh                 # all of tests/kernels, Triton 3.6.0
#   .ci/triton_versions.sh tests/kernels/test_kernels_rotary.py -x   # args go to pytest; paths
#                                                      # given replace tests/kernels
#   TRITON_VERSION=3.7.0 .ci/triton_versions.sh          # another Triton release
#
# The second environment, .cache/venv-triton<version>/ (git-ignored), holds only Triton, installed
# with pip from the configured registry (--no-deps); everything else (torch, numpy, pytest, the
# editable pretrain install) comes from ./.venv, appended to its sys.path by a .pth file, so Triton
# <version> wins. It is built once and reused while it still imports the right Triton and the
# project; otherwise it is rebuilt. Any failure to build it is an error (exit != 0), never a skip.
# Takes under a minute on 2 CPU cores (measured: 48 s from scratch, of which 11 s build the venv;
# 1.5 min when the machine is busy). Triton 3.9 runs the same tests in about 40 s.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
export PYTHONUNBUFFERED=1

TRITON_VERSION="${TRITON_VERSION:-3.6.0}"
MAIN_PY="$REPO/.venv/bin/python"
VENV="$REPO/.cache/venv-triton$TRITON_VERSION"
PY="$VENV/bin/python"

die() { echo "triton_versions.sh: $*" >&2; exit 1; }

[ -x "$MAIN_PY" ] || die "$MAIN_PY not found: run 'make setup' (or 'make test') first"
# The second venv uses the main venv's interpreter, so the two site-packages share one ABI.
BASE_PY="$("$MAIN_PY" -c 'import sys; print(sys._base_executable)')"
MAIN_SITE="$("$MAIN_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

check_env() {  # prints what it found; fails unless Triton comes from $VENV at $TRITON_VERSION
    "$PY" - "$TRITON_VERSION" "$VENV" "$REPO" <<'EOF'
import os, sys
want, venv, repo = sys.argv[1:]
import triton, torch, pytest, pretrain_kernels
print(f"triton {triton.__version__} ({os.path.dirname(triton.__file__)}), torch {torch.__version__}, "
      f"pretrain_kernels from {os.path.dirname(pretrain_kernels.__file__)}")
ok = (triton.__version__ == want and os.path.realpath(triton.__file__).startswith(os.path.realpath(venv))
      and os.path.realpath(pretrain_kernels.__file__).startswith(os.path.realpath(repo) + os.sep))
sys.exit(0 if ok else 1)
EOF
}

build_env() {
    echo "== building $VENV (triton==$TRITON_VERSION from the package registry)"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    "$BASE_PY" -m venv "$VENV" || die "python -m venv $VENV failed"
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps "triton==$TRITON_VERSION" \
        || die "pip could not install triton==$TRITON_VERSION"
    local site
    site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    # addsitedir (not a bare path) so the main venv's own .pth files (the editable install) run too.
    echo "import site; site.addsitedir('$MAIN_SITE')" > "$site/zz_pretrain_main_venv.pth"
}

start=$SECONDS
if [ -x "$PY" ] && info="$(check_env 2>&1)"; then
    echo "$info"
else
    build_env
    check_env || die "$VENV does not import triton $TRITON_VERSION from itself and the project from $REPO"
fi
echo "== environment ready in $((SECONDS - start)) s"

# The project's kernel tests run under the interpreter (tests/kernels/conftest.py sets it too).
export TRITON_INTERPRET=1
targets=(tests/kernels)  # unless the arguments name test paths themselves
for arg in "$@"; do
    case "$arg" in -*) ;; *) targets=() ;; esac
done
set +e
"$PY" -m pytest -q -p no:cacheprovider "${targets[@]}" "$@"
rc=$?
set -e
echo "== Triton $TRITON_VERSION kernel tests: exit $rc, $((SECONDS - start)) s in all"
exit "$rc"
