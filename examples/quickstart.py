"""Quickstart: build an untrained tiny GPT, run it, save and reload it.

    python examples/quickstart.py [OUT.safetensors]
    gpt info quickstart.safetensors
"""

import sys

import torch

from gptcli import GPT, ModelConfig, get_tokenizer, load_checkpoint, save_checkpoint

out = sys.argv[1] if len(sys.argv) > 1 else "quickstart.safetensors"
torch.manual_seed(0)

tokenizer = get_tokenizer("gpt2")  # GPT-2 BPE from the vocabulary shipped with gptcli
config = ModelConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size)
model = GPT(config).eval()
print(f"tiny preset: {model.num_params():,} parameters")

ids = torch.tensor([tokenizer.encode("Hello, my name is")])  # (1, T)
with torch.no_grad():
    logits = model(ids)  # (1, T, vocab_size)
    print("logits shape:", tuple(logits.shape))
    for _ in range(8):  # greedy decoding by full recomputation: simple, not fast
        next_id = model(ids[:, -config.context_length:])[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
print("untrained greedy continuation:", repr(tokenizer.decode(ids[0].tolist())))

save_checkpoint(out, model, tokenizer, source="examples/quickstart.py")
reloaded, tok, meta = load_checkpoint(out)
same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                             reloaded.state_dict().values()))
print(f"saved {out}; reloaded identical weights: {same}; format {meta['format']}")
