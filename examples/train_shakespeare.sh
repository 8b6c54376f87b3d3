#!/usr/bin/env bash
# The classic CPU exercise: a 0.8M-parameter character-level GPT on tiny Shakespeare.
# About 2 minutes on 2 CPU cores; validation loss ends near 1.88.
set -euo pipefail
gpt train --out runs/shakespeare-char --force   # the defaults are this exact configuration:
#   --preset tiny --tokenizer char --batch-size 12 --context-length 64 --lr 1e-3 --min-lr 1e-4
#   --warmup-steps 100 --max-steps 2000 --dropout 0 --weight-decay 0.1 --beta2 0.99 --grad-clip 1
gpt generate --model runs/shakespeare-char --prompt "ROMEO:" --max-new-tokens 300 --seed 1
gpt eval --model runs/shakespeare-char        # loss, perplexity, bits per byte on the corpus
