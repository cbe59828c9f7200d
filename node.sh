#!/usr/bin/env bash
# The two commands of the README:
#   ./node.sh serve   set up (first run only) and start the node on embedded defaults (node.toml)
#   ./node.sh test    set up (first run only) and run the whole test suite
#   ./node.sh lint    set up (first run only), then ruff check and mypy (configured in pyproject.toml)
# Set-up: a virtual environment in .venv with the package and its dependencies (torch and torchvision
# come together from the package registry), and, for the tests, Debian's dcmtk, dicom3tools, chromium,
# orthanc, orthanc-dicomweb, pixelmed-apps (+ a JDK: tests/pixelmed) and nodejs/npm when they are missing, and the pinned viewer
# packages of tests/viewer (npm ci).
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=.venv
STAMP="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"

setup_python() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  if [ ! -f "$STAMP" ]; then
    echo "node.sh: installing the node and its dependencies into $VENV (first run: several minutes)" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e ".[test]"
    rm -f "$VENV"/.installed-*
    touch "$STAMP"
  fi
}

setup_test_tools() {
  local missing=()
  for tool in storescu storescp echoscu; do [ -x "/usr/bin/$tool" ] || missing+=(dcmtk); done
  [ -x /usr/bin/dciodvfy ] || missing+=(dicom3tools)
  [ -x /usr/bin/chromium ] || missing+=(chromium)
  [ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
  [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
  [ -x /usr/bin/DicomSRValidator ] || missing+=(pixelmed-apps)
  command -v javac >/dev/null 2>&1 || missing+=(default-jdk-headless)
  command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
  [ ${#missing[@]} -eq 0 ] && return 0
  local pkgs; pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "node.sh: installing Debian packages: $pkgs" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pkgs >/dev/null
  else
    echo "node.sh: the tests need Debian packages: $pkgs; run: sudo apt-get install -y $pkgs" >&2
    exit 1
  fi
}

# The real-viewer test (tests/test_viewer.py): puppeteer-core pinned in tests/viewer/package-lock.json (npm ci,
# no browser download: Debian's chromium is used) and OHIF's built viewer, the @ohif/app tarball pinned with
# its sha512 in tests/viewer/ohif.pin (npm pack, only its dist/ is used: the registry lacks some of the
# dependencies that package declares). Installed once, into tests/viewer/node_modules (ignored by git).
setup_viewer() {
  local dir=tests/viewer
  if [ ! -d "$dir/node_modules/puppeteer-core" ]; then
    echo "node.sh: installing the pinned puppeteer-core into $dir/node_modules" >&2
    (cd "$dir" && PUPPETEER_SKIP_DOWNLOAD=1 npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
  fi
  [ -f "$dir/node_modules/@ohif/app/dist/index.html" ] && return 0
  local spec integrity tmp got
  read -r spec integrity < "$dir/ohif.pin"
  echo "node.sh: fetching the pinned OHIF viewer $spec" >&2
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack "$spec" --silent >/dev/null)
  got="sha512-$(node -e 'const c=require("crypto"),f=require("fs");process.stdout.write(c.createHash("sha512").update(f.readFileSync(process.argv[1])).digest("base64"))' "$tmp"/*.tgz)"
  if [ "$got" != "$integrity" ]; then
    echo "node.sh: $spec does not match the sha512 pinned in $dir/ohif.pin; not installing it" >&2
    rm -rf "$tmp"; exit 1
  fi
  mkdir -p "$dir/node_modules/@ohif/app"
  tar -xzf "$tmp"/*.tgz -C "$dir/node_modules/@ohif/app" --strip-components=1
  rm -rf "$tmp"
}

case "${1:-}" in
  serve)
    shift
    setup_python
    exec "$VENV/bin/dicom-node" -c node.toml serve "$@"
    ;;
  lint)
    shift
    setup_python
    "$VENV/bin/ruff" check .
    exec "$VENV/bin/mypy"
    ;;
  test)
    shift
    setup_python
    setup_test_tools
    setup_viewer
    export TCP_NODELAY=1
    # three workers on the two cores CI has: a third of the suite's time is spent waiting on peers, timers and
    # subprocesses (measured on an idle 2-core machine: 885 s with two workers, 770 s with three, both passing);
    # each test module runs whole on one worker, the heaviest first (tests/conftest.py). Arguments given later
    # win: ./node.sh test -n 0 runs in this process
    exec "$VENV/bin/python" -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder "$@"
    ;;
  *)
    echo "usage: ./node.sh serve | ./node.sh lint | ./node.sh test [pytest args]" >&2
    exit 2
    ;;
esac
