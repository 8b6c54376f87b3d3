#!/usr/bin/env bash
# Fine-tuning: start from a trained checkpoint and go on training on other text.
# Here: the Shakespeare char model (examples/train_shakespeare.sh) fine-tuned on one play's
# speeches of a single character. With a downloaded model: --init-from gpt2 (GPT-2 tokenizer).
set -euo pipefail
base=${1:-runs/shakespeare}
[ -d "$base" ] || { echo "train the base model first: gpt train (or bash examples/train_shakespeare.sh)" >&2; exit 1; }
mkdir -p runs
# every speech of MENENIUS from the bundled corpus, as a small fine-tuning set (kept under runs/,
# beside the runs, not in a folder of its own)
python - <<'PY'
from gptcli.data import bundled_corpus
speeches = [s for s in bundled_corpus().read_text().split("\n\n") if s.startswith("MENENIUS")]
open("runs/menenius.txt", "w").write("\n\n".join(speeches) + "\n")
print(f"{len(speeches)} speeches")
PY
gpt train --init-from "$base" --data runs/menenius.txt --out runs/menenius --force \
  --lr 3e-4 --min-lr 3e-5 --warmup-steps 20 --max-steps 300 --eval-interval 50 --val-fraction 0.1
gpt generate --model runs/menenius --prompt "MENENIUS:" --max-new-tokens 200 --seed 1
