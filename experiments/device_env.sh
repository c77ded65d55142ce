# Sourced by the experiments/device_*.sh scripts on the lent GPU machine: install the carried wheels (.whl)
# and unpack the carried synthesizer packages (.debs) outside /, then point the workbench at them.
: "${OUT:?run this through the device tool (OUT must be set)}"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
for f in .debs/*.deb; do dpkg -x "$f" /tmp/tts; done
export WB_TTS_LD_LIBRARY_PATH=/tmp/tts/usr/lib/x86_64-linux-gnu:/tmp/tts/usr/lib/x86_64-linux-gnu/pulseaudio:/tmp/tts/lib/x86_64-linux-gnu
export WB_ESPEAK=/tmp/tts/usr/bin/espeak-ng WB_ESPEAK_DATA=/tmp/tts/usr/lib/x86_64-linux-gnu/espeak-ng-data
export WB_FLITE=/tmp/tts/usr/bin/flite WB_FORTUNES_DIR=/tmp/tts/usr/share/games/fortunes WB_CACHE=/tmp/wbcache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
