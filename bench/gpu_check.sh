#!/usr/bin/env bash
# The GPU check, in one run: the CUDA encoder path (fp32 vs bf16 autocast, bench/gpu_encoder.py), faiss GPU
# k-means in the index's training step (bench/gpu_kmeans.py), and the whole build with the CUDA encoder
# (bench/build_throughput.py). Prints one JSON object; each section that fails records its error there and
# the others still run. Capped at 8 minutes: the time limits of the install steps and sections add up to that.
#
#   bench/gpu_check.sh [--wheels DIR] [--out FILE] [--dry-run]
#   bench/gpu_check.sh --fetch-wheels DIR [--python-version 3.12]
#
# A GPU machine without network access gets the Python packages it lacks as wheels (bench/gpu_requirements.txt:
# one group per section): fetch them where pip reaches PyPI with --fetch-wheels, for the GPU machine's Python
# version, carry the folder along, and pass it as --wheels (default bench-out/wheels). They are installed under
# a temporary prefix, never into the machine's Python; a group whose imports already work is not installed.
# Without a GPU (torch sees no CUDA device), or with --dry-run, the script runs every section on the CPU with
# small sizes and reports the install step without installing: everything but the CUDA parts.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
WHEELS=bench-out/wheels OUT_FILE="" DRY="" FETCH="" PYVER=3.12

while (($#)); do
  case $1 in
    --wheels) WHEELS=$2; shift 2 ;;
    --out) OUT_FILE=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --fetch-wheels) FETCH=$2; shift 2 ;;
    --python-version) PYVER=$2; shift 2 ;;
    *) echo "unknown argument $1; see the header of $0" >&2; exit 2 ;;
  esac
done

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# The requirement lines of one group of bench/gpu_requirements.txt ("" = every group, each line once).
requirements() {
  awk -v want="$1" '/^# \[/ {group = substr($2, 2, length($2) - 2); next}
                    /^[[:space:]]*(#|$)/ {next}
                    want == "" || group == want {print $1}' bench/gpu_requirements.txt | sort -u
}

if [[ -n $FETCH ]]; then
  requirements "" > "$WORK/all.txt"
  mkdir -p "$FETCH"
  platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
  done
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${platforms[@]}" -d "$FETCH" -r "$WORK/all.txt" || exit 1
  du -sh "$FETCH"
  exit 0
fi

has_gpu=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
[[ $has_gpu == 1 ]] || DRY=1
SITE=$WORK/site
purelib=$("$PY" -c "import sysconfig; print(sysconfig.get_path('purelib', vars={'base': '$SITE', 'platbase': '$SITE'}))")
export PYTHONPATH="$purelib:$ROOT" HF_HUB_OFFLINE=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 PYTHONUNBUFFERED=1

# run_section NAME LIMIT_S COMMAND...: stdout (one JSON object) to NAME.json, stderr to NAME.err, exit status
# and seconds to NAME.rc / NAME.s. A section given by `skip NAME REASON` records REASON instead.
run_section() {
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  timeout "$limit" "$@" > "$WORK/$name.json" 2> "$WORK/$name.err"
  echo $? > "$WORK/$name.rc"
  echo $((SECONDS - start)) > "$WORK/$name.s"
}
skip() { echo "$2" > "$WORK/$1.err"; echo skipped > "$WORK/$1.rc"; }

# Whether a group's packages import (and, for kmeans, whether faiss sees a GPU).
probe() {
  case $1 in
    encoder) "$PY" -c "import open_clip" ;;
    kmeans) "$PY" -c "import ray, faiss; assert faiss.get_num_gpus() > 0 or '$DRY', 'faiss sees no GPU'" ;;
    build) "$PY" -c "import ray, webdataset, pycocotools, open_clip" ;;
  esac
}

# install_group GROUP: importable already, else (not dry) pip from the wheel folder only. Prints a JSON value.
install_group() {
  local group=$1
  requirements "$group" > "$WORK/$group.req"
  if probe "$group" 2>/dev/null; then echo '"importable"'; return 0; fi
  if [[ -n $DRY ]]; then
    local have=0 want=0 line
    while read -r line; do
      want=$((want + 1))
      compgen -G "$WHEELS/$(echo "${line%%==*}" | tr - _)-${line##*==}-*.whl" > /dev/null && have=$((have + 1))
    done < "$WORK/$group.req"
    echo "\"not importable; dry run, not installed: $have of $want wheels in $WHEELS\""
    return 1
  fi
  if [[ ! -d $WHEELS ]]; then
    echo "\"no wheel folder $WHEELS: fetch it where pip reaches PyPI with bench/gpu_check.sh --fetch-wheels $WHEELS --python-version $("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")') and bring it along\""
    return 1
  fi
  local limit
  case $group in encoder) limit=20 ;; build) limit=40 ;; kmeans) limit=100 ;; esac  # kmeans: 874 MB of wheels
  if timeout "$limit" "$PY" -m pip install -q --no-index --find-links "$WHEELS" --prefix "$SITE" --no-warn-script-location \
       -r "$WORK/$group.req" > "$WORK/$group.pip" 2>&1 && probe "$group" 2> "$WORK/$group.probe"; then
    echo '"installed"'
    return 0
  fi
  "$PY" -c "import json, sys; print(json.dumps('install failed: ' + sys.stdin.read()[-1500:]))" \
    < <(cat "$WORK/$group.pip" "$WORK/$group.probe" 2>/dev/null)
  return 1
}

run_section env 20 "$PY" - <<'EOF'
import json, os, platform, subprocess, sys
import torch
smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                     capture_output=True, text=True) if torch.cuda.is_available() else None
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "nvidia_smi": smi.stdout.strip() if smi else None, "cpus": os.cpu_count()}))
EOF

declare -A installed
printf '{' > "$WORK/install.json"
for group in encoder kmeans build; do
  status=$(install_group "$group") && installed[$group]=1
  printf '"%s": %s, ' "$group" "$status" >> "$WORK/install.json"
done
printf '"prefix": "%s"}\n' "$SITE" >> "$WORK/install.json"
echo 0 > "$WORK/install.rc"

ready() { [[ -n ${installed[$1]:-} || -n $DRY ]]; }
if [[ -n $DRY ]]; then
  enc=(--encoder synthetic-clip --device cpu --batch-size 4 --batches 2 --warmup 1)
  km=(--vectors 20000 --dim 64 --nlist 256 --cpu-only)
  build=(--encoder synthetic-clip --shards 2 --samples-per-shard 8 --batch-size 8)
else
  enc=(--encoder clip-vit-b16 --device cuda --batch-size 64 --batches 20)
  km=(--target-segments 1000000 --dim 512)
  build=(--encoder clip-vit-b16 --shards 8 --samples-per-shard 64 --batch-size 64)
fi
if ready encoder; then run_section encoder 80 "$PY" bench/gpu_encoder.py "${enc[@]}"
else skip encoder "not run: the encoder group is not installed (see install)"; fi
if ready kmeans; then run_section kmeans 100 "$PY" bench/gpu_kmeans.py "${km[@]}"
else skip kmeans "not run: the kmeans group is not installed (see install)"; fi
if ready build && ready encoder; then run_section build 120 "$PY" bench/build_throughput.py "${build[@]}"
else skip build "not run: the build or encoder group is not installed (see install)"; fi

"$PY" - "$WORK" "$DRY" "$OUT_FILE" <<'EOF'
import json, os, subprocess, sys
work, dry, out_file = sys.argv[1:]
def section(name):
    read = lambda ext: open(os.path.join(work, f"{name}.{ext}")).read().strip() if os.path.exists(
        os.path.join(work, f"{name}.{ext}")) else ""
    rc, seconds = read("rc"), read("s")
    result = {"seconds": int(seconds)} if seconds else {}
    if rc == "0":
        try:
            return {**json.loads(read("json")), **result}
        except ValueError as exc:
            return {**result, "error": f"output is not one JSON object ({exc}): {read('json')[-800:]}"}
    status = {"skipped": "skipped", "124": "timed out"}.get(rc, f"exit status {rc}")
    return {**result, "error": f"{status}: {read('err')[-1500:]}"}
git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
commit = (git("rev-parse", "HEAD") + ("-dirty" if git("status", "--porcelain") else "")) or None
report = {"dry_run": bool(dry), "commit": commit, **{n: section(n) for n in ("env", "install", "encoder", "kmeans", "build")}}
text = json.dumps(report, indent=1)
print(text)
if out_file:
    with open(out_file, "w") as f:
        f.write(text + "\n")
EOF
