#!/usr/bin/env bash
# The classic CPU exercise: a 0.8M-parameter character-level GPT on tiny Shakespeare.
# About 2 minutes on 2 CPU cores; validation loss ends near 1.88.
set -euo pipefail
# runs/shakespeare is where plain `gpt train` puts this run (the README's tour): a finished run is
# left as it is (--resume auto continues a stopped one, or starts it if there is none).
gpt train --out runs/shakespeare --resume auto   # the defaults are this exact configuration:
#   --preset tiny --tokenizer char --batch-size 12 --context-length 64 --lr 1e-3 --min-lr 1e-4
#   --warmup-steps 100 --max-steps 2000 --dropout 0 --weight-decay 0.1 --beta2 0.99 --grad-clip 1
gpt generate --model runs/shakespeare --prompt "ROMEO:" --max-new-tokens 300 --seed 1
gpt eval --model runs/shakespeare        # loss, perplexity, bits per byte on the corpus
