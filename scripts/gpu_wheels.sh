#!/usr/bin/env bash
# Fills .whl/ with the packages `make gpu-check` needs that a GPU machine without a registry
# lacks (the lent H200: Python 3.12 with torch 2.11, no webdataset, no DeepSpeed). Run it here,
# where pip reaches a registry; carry .whl/ to that machine; `make gpu-check` installs the
# wheels into a folder of its own there.
#
#   scripts/gpu_wheels.sh [PYTHON_VERSION]        # default 3.12: that machine's Python
#
# - webdataset (+ braceexpand): the shard writer, for the shard loader row.
# - DeepSpeed publishes only an sdist, and building one needs torch: it is built here into a
#   pure-Python wheel with DS_BUILD_OPS=0 (its CUDA ops, FusedAdam among them, compile there on
#   first use), plus what it needs and that machine lacks: hjson, pydantic and pydantic's own
#   (pydantic-core is the one platform wheel), typing-extensions new enough for them.
# - Not wandb (a 20 MB platform wheel) nor submitit: the check runs with log.wandb.mode=disabled
#   and submits no job.
# Versions are this checkout's venv's (`make setup`), so both machines run the same ones.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYVER=${1:-3.12}
OUT=.whl
[ -x "$PY" ] || { echo "gpu_wheels: $PY not found; run \`make setup\` first (or PY=...)" >&2; exit 2; }

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

# pip installs one version of each; an older wheel left beside a newer one would stop it.
rm -rf "$OUT"
mkdir -p "$OUT"
pins=()
for name in webdataset braceexpand hjson pydantic pydantic-core annotated-types \
    typing-inspection typing-extensions; do
  pins+=("$name==$(version "$name")")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$OUT" "${pins[@]}"

sdist=$(mktemp -d)
trap 'rm -rf "$sdist"' EXIT
# --no-build-isolation: DeepSpeed's setup.py imports torch, which the venv has.
"$PY" -m pip download -q --no-deps --no-binary=:all: --no-build-isolation -d "$sdist" \
  "deepspeed==$(version deepspeed)"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-index --no-build-isolation -w "$OUT" \
  "$sdist"/deepspeed-*.tar.gz

ls -1 "$OUT"
echo "gpu_wheels: $(du -sh "$OUT" | cut -f1) in $OUT/; carry it (device run: carry [\".whl\"])"
