#!/usr/bin/env bash
# Creates .venv and installs mxcube-autocenter into it (editable, with the test
# and web extras). Called by `make`; does nothing that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
STAMP=$VENV/.installed
WEB_MISSING=$VENV/.web-extra-missing  # the optional web extra failed to install

# python-ldap (a dependency of mxcubecore) compiles against these headers.
SYSTEM_PACKAGES="libldap2-dev libsasl2-dev"

missing_system_packages() {
    local missing=""
    for pkg in $SYSTEM_PACKAGES; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing="$missing $pkg"
    done
    echo "$missing"
}

# What Debian's own Python lacks for this: venv's ensurepip, Python.h and a C compiler (python-ldap compiles).
missing_python_parts() {
    local py=$1 version missing=""
    version=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    "$py" -c 'import ensurepip' 2>/dev/null || missing="$missing python$version-venv"
    "$py" -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        || missing="$missing python$version-dev"
    command -v gcc >/dev/null 2>&1 || missing="$missing gcc"
    echo "$missing"
}

find_python() {
    for candidate in "${PYTHON:-}" python3.11 python3.10 python3; do
        [ -n "$candidate" ] || continue
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" -c 'import sys; sys.exit(not ((3, 10) <= sys.version_info[:2] < (3, 12)))'; then
            echo "$candidate"
            return
        fi
    done
    echo "error: mxcubecore needs Python 3.10 or 3.11; install python3.11 or set PYTHON=/path/to/python3.11" >&2
    exit 1
}

if [ -f "$STAMP" ] && [ "$STAMP" -nt setup.cfg ] && [ "$STAMP" -nt pyproject.toml ] \
    && [ "$STAMP" -nt scripts/bootstrap.sh ]; then
    if [ -f "$WEB_MISSING" ]; then
        echo "warning: the web extra (mxcubeweb) is not installed, so the web tests are skipped;" \
            "to try again: rm $STAMP && make install" >&2
    fi
    exit 0
fi

if [ -x "$VENV/bin/python" ]; then
    python=$VENV/bin/python
else
    python=$(find_python)
fi

if command -v dpkg-query >/dev/null 2>&1; then
    missing="$(missing_system_packages)$(missing_python_parts "$python")"
    if [ -n "$missing" ]; then
        if [ "$(id -u)" -eq 0 ]; then
            echo "Installing system packages:$missing"
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
        else
            echo "error: installing mxcubecore (python-ldap) needs the system packages:$missing" >&2
            echo "       run: sudo apt-get install$missing   (then run make again)" >&2
            exit 1
        fi
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$python" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# The web extra (mxcubeweb) is optional: without it only the web tests are skipped, which every later make says
# (a network failure must not drop those tests unnoticed) until `make install` after removing the stamp.
if "$VENV/bin/python" -m pip install --quiet -e ".[test,web]"; then
    rm -f "$WEB_MISSING"
else
    echo "warning: the web extra (mxcubeweb) did not install; installing without it" >&2
    "$VENV/bin/python" -m pip install --quiet -e ".[test]"
    touch "$WEB_MISSING"
fi
# lucid3 asks for OpenCV's full build, this package for the headless one, and both write cv2/. Where the full
# one lands last, cv2 needs libGL and the X libraries, which a server has not: the headless one takes cv2/ back.
if ! "$VENV/bin/python" -c "import cv2" 2>/dev/null; then
    headless=$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("opencv-python-headless"))')
    "$VENV/bin/python" -m pip install --quiet --force-reinstall --no-deps "opencv-python-headless==$headless"
fi
"$VENV/bin/python" -c "import cv2" || { echo "error: OpenCV (cv2) does not import in $VENV" >&2; exit 1; }
touch "$STAMP"
