#!/usr/bin/env bash
# The GPU row of issue 30 in one short device call: an 8B-shaped synthetic Llama (Llama-3-8B's shapes, SmolLM2's
# vocabulary, random weights) in bf16 on one GPU: statistics tokens/s, seconds per edit in one batch of 100, peak
# VRAM (benchmarks/speed.py's table). Runs only where an NVIDIA GPU is.
#
#   bash benchmarks/gpu.sh --prepare     # here, once: .gpu/ = SmolLM2's tokenizer + the benchmark data it reads
#   device run: command "bash benchmarks/gpu.sh", carry [".gpu"], timeout_s 540
#
# The device image has torch, transformers, accelerate and safetensors but no network: the tokenizer and data travel
# in .gpu/ (ignored by git, never committed). Statistics on 20,000 WikiText tokens; targets none (export and verify
# are CPU work, measured by memory.py).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
if [ "${1:-}" = "--prepare" ]; then
  mkdir -p "$root/.gpu/data/counterfact" "$root/.gpu/data/wikitext-2-raw"
  grep -qx '/.gpu/' "$root/.git/info/exclude" 2>/dev/null || echo '/.gpu/' >> "$root/.git/info/exclude"
  cp "$root/../shared/data/wikitext-2-raw/wiki.test.raw" "$root/.gpu/data/wikitext-2-raw/"
  "$root/.venv/bin/python" - "$root" <<'PY'
import json, sys
from pathlib import Path
from transformers import AutoTokenizer
from edit2deploy.models import resolve_model_dir
root = Path(sys.argv[1])
AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m")).save_pretrained(root / ".gpu/tokenizer")
cases = json.loads((root.parent / "shared/data/counterfact/counterfact-val.json").read_text())[:200]
(root / ".gpu/data/counterfact/counterfact-val.json").write_text(json.dumps(cases))
PY
  # the one import the device image lacks (pure Python; its own dependencies are there)
  "$root/.venv/bin/pip" download -q --no-deps --only-binary=:all: -d "$root/.gpu/wheels" "gguf==$("$root/.venv/bin/python" -c 'import importlib.metadata as m; print(m.version("gguf"))')"
  du -sh "$root/.gpu"
  exit 0
fi
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L; then
  echo "gpu.sh: no NVIDIA GPU here; nothing to measure"
  exit 0
fi
[ -d "$root/.gpu/tokenizer" ] || { echo "gpu.sh: .gpu/ is missing: run 'bash benchmarks/gpu.sh --prepare' here and carry .gpu"; exit 2; }
python3 -m pip install -q --no-deps --no-index --target /tmp/gpu-pylib "$root"/.gpu/wheels/*.whl
export PYTHONPATH="$root:/tmp/gpu-pylib" HF_HUB_OFFLINE=1 EDIT2DEPLOY_BENCH_DATA="$root/.gpu/data"
export EDIT2DEPLOY_CACHE="${TMPDIR:-/tmp}/edit2deploy-cache" TQDM_DISABLE=1
out="${OUT:-/tmp}"
cd "$here"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
t0=$(date +%s)
model=$(python3 memory.py --make 8b --tokenizer "$root/.gpu/tokenizer" --root /tmp/gpu-models --device cuda | tail -1)
echo "8B-shaped model made in $(( $(date +%s) - t0 )) s: $model"
python3 speed.py --device cuda --model "$model" --n 100 --batch-size 100 --layers 4-8 --variants batched \
  --targets none --n-tokens 20000 --json "$out/gpu-speed.json" 2>&1 | tee "$out/gpu-speed.txt"
