#!/usr/bin/env bash
# Ray scaling of the sensitivity stage (issue 19) on the lent host's CPUs (its GPU unused), through
# experiments/bench_ray.py. Carried in git-excluded .raybench/ (64 MiB a call with the ~45 MiB tracked tree, so two
# calls chained while the machine is warm, 30 s):
#   bash experiments/device_ray.sh setup                  carry [.raybench/c5]: ray-min.tar.xz (Ray 2.60 without
#                                                          its Java jars and its data/serve/tune/train libraries)
#                                                          and the wheels the device lacks
#   bash experiments/device_ray.sh bench BENCH-ARGS...    carry [.raybench/c2/corpus]: 64 calibration + 100 test
#                                                          utterances made here (the device has no synthesizers)
# The bench's output JSON goes to $OUT; the CPU's int8 flags and the host line to $OUT/probe.txt.
set -u
STEP=${1:?step}
shift
S=/tmp/site
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=$S:$PWD
case $STEP in
  setup)
    mkdir -p "$S"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$S" .raybench/c5/*.whl || exit 2
    tar -xJf .raybench/c5/ray-min.tar.xz -C "$S" || exit 2
    # the carried corpus is features already: fbank is never computed there
    python3 -c "import kaldi_native_fbank" 2>/dev/null || echo '# not used: features are carried' > "$S/kaldi_native_fbank.py"
    {
      grep -o -w -E 'amx_int8|avx512_vnni|avx_vnni|avx2' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
      lscpu | grep -E 'Model name|^CPU\(s\)|Thread|Core|Socket'
      python3 -c "import ray, onnxruntime as o, sys; print('python', sys.version.split()[0], 'ray', ray.__version__, 'onnxruntime', o.__version__)"
      python3 -c "from core.host import describe, host_info; print('describe:', describe(host_info()))"
    } 2>&1 | tee "${OUT:-/tmp}/probe.txt"
    ;;
  bench)
    [ -d "$S/ray" ] || { echo "run the setup step first (while the machine is warm)"; exit 3; }
    python3 experiments/bench_ray.py --corpus .raybench/c2/corpus --work /tmp/bench_ray "$@"
    ;;
  *) echo "unknown step $STEP"; exit 1 ;;
esac
