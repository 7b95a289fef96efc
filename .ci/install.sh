#!/usr/bin/env bash
# Installs everything cgh needs into .venv, offline except for the package registries.
# Re-running is fast: a stamp (hash of this script + pyproject.toml) skips work already done.
#
#   CGH_CACHE_DIR            where built wheels are cached (default ~/.cache/cgh); the mmcv build
#                            (~10 min on 2 cores) happens once per torch/mmcv version.
#   CGH_DETECTRON2_SOURCE    an official detectron2 source folder or git URL to install instead of
#                            the offline route (e.g. git+https://github.com/facebookresearch/detectron2.git)
#   PYTHON                   interpreter for the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=$ROOT/.venv
PY=$VENV/bin/python
CACHE=${CGH_CACHE_DIR:-$HOME/.cache/cgh}
TORCH=2.14.1
TORCHVISION=0.29.1
MMCV=2.1.0
D2_SDIST_SHA256=5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29

stamp_of() { cat .ci/install.sh pyproject.toml transfer/compat/detectron2_C.py | sha256sum | cut -c1-16; echo "${CGH_DETECTRON2_SOURCE:-}"; }
STAMP=$VENV/.cgh-install-stamp
if [[ -f $STAMP && "$(cat "$STAMP")" == "$(stamp_of)" ]]; then
    echo "[install] .venv is up to date"
    exit 0
fi

[[ -x $PY ]] || "${PYTHON:-python3}" -m venv "$VENV"
pip_() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

echo "[install] torch $TORCH / torchvision $TORCHVISION"
pip_ "torch==$TORCH" "torchvision==$TORCHVISION" "setuptools<81" wheel

echo "[install] cgh and its pinned pure-Python dependencies"
pip_ -e ".[test]"

# mmcv 2.1.0 with compiled ops: built once, cached outside the repo.
# torch 2.14 headers need C++20 while mmcv's setup.py forces -std=c++14/17, so CC/CXX are
# wrappers that rewrite the flag (no source edit).
TAG=$("$PY" -c "import sys,torch; print(f'torch{torch.__version__.split(\"+\")[0]}-py{sys.version_info[0]}{sys.version_info[1]}')")
MMCV_CACHE=$CACHE/wheels/mmcv-$MMCV-$TAG
if ! "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '$MMCV'" 2>/dev/null; then
    if ! ls "$MMCV_CACHE"/mmcv-*.whl >/dev/null 2>&1; then
        echo "[install] building mmcv $MMCV with ops (once; about 10-12 minutes on 2 cores)"
        WRAP=$(mktemp -d)
        for c in gcc g++; do
            cat > "$WRAP/$c" <<WRAPPER
#!/usr/bin/env bash
args=()
for a in "\$@"; do
  case "\$a" in -std=c++14|-std=c++17) args+=(-std=c++20) ;; *) args+=("\$a") ;; esac
done
exec /usr/bin/$c "\${args[@]}"
WRAPPER
            chmod +x "$WRAP/$c"
        done
        mkdir -p "$MMCV_CACHE.tmp"
        CC=$WRAP/gcc CXX=$WRAP/g++ MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} \
            "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-binary mmcv \
            -w "$MMCV_CACHE.tmp" "mmcv==$MMCV"
        rm -rf "$MMCV_CACHE" && mv "$MMCV_CACHE.tmp" "$MMCV_CACHE"
    fi
    pip_ --no-deps "$MMCV_CACHE"/mmcv-*.whl
    pip_ addict yapf
fi

# detectron2: the official source if one is named, else the offline route (DEPENDENCIES.md):
# the pure-Python package from PyPI's pb1-detectron2 0.6 sdist (sha256-checked, byte-identical to
# upstream v0.6) plus a placeholder for its C++ extension.
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if [[ -n "${CGH_DETECTRON2_SOURCE:-}" ]]; then
    echo "[install] detectron2 from $CGH_DETECTRON2_SOURCE"
    pip_ --no-build-isolation "$CGH_DETECTRON2_SOURCE"
elif [[ ! -f $SITE/detectron2/.cgh-offline ]]; then
    echo "[install] detectron2 0.6 (offline route)"
    D2=$CACHE/detectron2
    mkdir -p "$D2"
    SDIST=$D2/pb1-detectron2-0.6.tar.gz
    if [[ ! -f $SDIST ]]; then
        TMP=$(mktemp -d)
        "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$TMP" pb1-detectron2==0.6
        mv "$TMP"/pb1*detectron2-0.6.tar.gz "$SDIST"
    fi
    echo "$D2_SDIST_SHA256  $SDIST" | sha256sum -c --quiet - || {
        echo "[install] ERROR: sha256 of $SDIST does not match $D2_SDIST_SHA256" >&2; exit 1; }
    TMP=$(mktemp -d)
    tar -xzf "$SDIST" -C "$TMP"
    rm -rf "$SITE/detectron2"
    cp -r "$TMP"/*/detectron2 "$SITE/detectron2"
    cp transfer/compat/detectron2_C.py "$SITE/detectron2/_C.py"
    touch "$SITE/detectron2/.cgh-offline"
    rm -rf "$TMP"
fi

# Headless Chromium renders the HTML report in the tests (Debian package).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
    echo "[install] chromium (Debian) for the report rendering test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "[install] WARNING: chromium could not be installed; the HTML rendering test will fail"
fi

"$PY" -c "import torch, torchvision, mmcv, mmcv.ops, mmseg, detectron2, cgh; print('[install] ok: torch', torch.__version__, 'mmcv', mmcv.__version__, 'detectron2', detectron2.__version__)"
stamp_of > "$STAMP"
