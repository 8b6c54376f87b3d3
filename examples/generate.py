"""Generate text with the Python API: load a checkpoint, sample with a KV cache, stream.

    python examples/generate.py runs/shakespeare "ROMEO:"
    python examples/generate.py gpt2 "The meaning of life is"     # after `gpt download gpt2`
"""

import sys

from gptcli.config import SampleConfig
from gptcli.generate import generate, load_generator, prompt_ids

model_name = sys.argv[1] if len(sys.argv) > 1 else None  # None: the latest run under ./runs
prompt = sys.argv[2] if len(sys.argv) > 2 else "ROMEO:"

loaded = load_generator(model_name, device="auto")  # add quantize="int8" for int8 weights
model, tokenizer = loaded.model, loaded.tokenizer
print(f"# {loaded.path}: {model.num_params():,} parameters", file=sys.stderr)

ids, warning = prompt_ids(tokenizer, prompt, model.config.context_length)
config = SampleConfig(max_new_tokens=120, temperature=0.8, top_p=0.95, seed=0)

# Stream one sample as it is produced ...
print(prompt, end="")
samples, stats = generate(model, tokenizer, ids, config,
                          on_text=lambda i, piece: print(piece, end="", flush=True))
print(f"\n# {stats.new_tokens} tokens, {stats.decode_tokens_per_s:.0f} tokens/s", file=sys.stderr)

# ... or three at once, as one batch, each stopping at a blank line.
config = config.model_copy(update={"num_samples": 3, "stop": ["\n\n"], "seed": 1})
samples, _ = generate(model, tokenizer, ids, config)
for n, s in enumerate(samples, 1):
    print(f"--- sample {n} ({s.finish_reason}) ---\n{prompt}{s.text}")
