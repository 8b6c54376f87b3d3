"""Attention, step by step: by hand on a toy example, then inside a real GPT through gptcli.

    python examples/attention_demo.py [CHECKPOINT] [TEXT]

1. scaled dot-product attention by hand on four tokens
2. causal masking: a token may not look at the future
3. multi-head attention: split the width into heads, attend in each, put them back together
4. the same maths checked against PyTorch's fused kernel
5. a real checkpoint (CHECKPOINT, or a freshly initialised tiny GPT): its own attention maps,
   recomputed by hand from its weights, then shown the way `gpt inspect-attention` shows them
"""

import math
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

from gptcli import GPT, ModelConfig, get_tokenizer, load_checkpoint, save_checkpoint
from gptcli import attention

torch.set_printoptions(precision=3, sci_mode=False)
g = torch.Generator().manual_seed(0)  # every random number below comes from here


def step(title):
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)))


# --------------------------------------------------------------------------- 1. by hand
step("1. scaled dot-product attention by hand")
words = ["the", "cat", "sat", "down"]
T, d = len(words), 4
x = torch.randn(T, d, generator=g)  # one embedding vector per token: (T, d)
W_q, W_k, W_v = (torch.randn(d, d, generator=g) / math.sqrt(d) for _ in range(3))
q, k, v = x @ W_q, x @ W_k, x @ W_v  # each (T, d)
print("each token asks a question (query), offers a label (key) and carries a value:")
print("q, k, v shapes:", tuple(q.shape), tuple(k.shape), tuple(v.shape))
scores = q @ k.T / math.sqrt(d)  # (T, T): how well query i matches key j
print("scores = q @ k.T / sqrt(d)  (row i: token i's match with every token j)\n", scores)
print("dividing by sqrt(d) keeps the scores' spread near 1, so softmax does not saturate")
weights = scores.softmax(dim=-1)  # each row is a probability distribution over tokens
print("weights = softmax(scores) per row; each row sums to 1:\n", weights)
out = weights @ v  # (T, d): each token's output is a weighted mix of all values
print("output = weights @ v: token 'cat' gets", out[1])

# --------------------------------------------------------------------------- 2. causal mask
step("2. causal masking")
future = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)  # True above the diagonal
print("a language model predicts the next token, so token i may only see tokens 0..i;")
print("future positions get score -inf, which softmax turns into weight 0:")
causal = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
for i, word in enumerate(words):
    row = "  ".join(f"{words[j]}:{causal[i, j]:.2f}" for j in range(i + 1))
    print(f"  {word:>5} attends to  {row}")
print("row sums:", causal.sum(-1), "  weight on the future:", causal[future].sum().item())

# --------------------------------------------------------------------------- 3. multi-head
step("3. multi-head attention")
B, T, C, n_head = 1, 6, 8, 2
hs = C // n_head  # head size
x = torch.randn(B, T, C, generator=g)
W_qkv = torch.randn(C, 3 * C, generator=g) / math.sqrt(C)  # like GPT-2's c_attn, one matrix
q, k, v = (x @ W_qkv).split(C, dim=2)  # each (B, T, C)
print(f"width C={C} split into {n_head} heads of size {hs}: each head attends on its own")
q = q.view(B, T, n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
k = k.view(B, T, n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
v = v.view(B, T, n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
print("after view + transpose, q is (B, n_head, T, head_size) =", tuple(q.shape))
mask = torch.ones(T, T, dtype=torch.bool).tril()
att = (q @ k.transpose(-2, -1) / math.sqrt(hs)).masked_fill(~mask, float("-inf")).softmax(-1)
print("attention weights (B, n_head, T, T) =", tuple(att.shape), "- one map per head:")
for h in range(n_head):
    print(f"  head {h}, last token's weights:", att[0, h, -1])
y = (att @ v).transpose(1, 2).reshape(B, T, C)  # heads side by side again: (B, T, C)
print("outputs of the heads concatenated back to (B, T, C) =", tuple(y.shape),
      "(a projection c_proj then mixes them)")

# --------------------------------------------------------------------------- 4. fused kernel
step("4. the same maths in PyTorch's fused kernel")
fused = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
print("F.scaled_dot_product_attention equals ours:",
      torch.allclose(fused, att @ v, atol=1e-6), "- but it never builds the (T, T) weights,")
print("which is why gptcli's attention has a manual path (need_weights=True) to show them")

# --------------------------------------------------------------------------- 5. a real GPT
step("5. inside a real GPT")
text = sys.argv[2] if len(sys.argv) > 2 else "The cat sat on the mat. The cat sat on the"
tmp = tempfile.TemporaryDirectory()
if len(sys.argv) > 1:
    path = sys.argv[1]
    model, tokenizer, _ = load_checkpoint(path)
    print(f"loaded {path}")
else:
    tokenizer = get_tokenizer("gpt2")
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size)).eval()
    path = save_checkpoint(Path(tmp.name) / "tiny.safetensors", model, tokenizer)
    print("a freshly initialised tiny GPT (untrained: expect nearly uniform, 'broad' heads;")
    print("try a trained one: python examples/attention_demo.py runs/<run>/best.safetensors)")
cfg = model.config
ids = torch.tensor([tokenizer.encode(text)])  # (1, T)
print(f"{cfg.n_layer} layers x {cfg.n_head} heads, head size {cfg.head_size}; text of "
      f"{ids.size(1)} tokens:", [attention.token_label(tokenizer, i) for i in ids[0].tolist()])
with torch.no_grad():
    logits, maps = model(ids.to(model.device), need_weights=True)
print("model(idx, need_weights=True) -> logits", tuple(logits.shape), "and one map per layer,",
      tuple(maps[0].shape), "= (B, n_head, T, T)")

# Recompute layer 0 by hand, exactly as in steps 1-3, from the model's own weights.
with torch.no_grad():
    pos = torch.arange(ids.size(1), device=model.device)
    x = model.wte(ids.to(model.device))
    if cfg.position == "learned":
        x = x + model.wpe(pos)
    elif cfg.position == "sinusoidal":
        from gptcli.model import sinusoidal_positions

        x = x + sinusoidal_positions(pos, cfg.n_embd)
    if cfg.position != "rope":  # rope rotates q and k by position: left out of this sketch
        block = model.h[0]
        q, k, _ = block.attn.c_attn(block.ln_1(x)).split(cfg.n_embd, dim=2)
        q = q.view(1, -1, cfg.n_head, cfg.head_size).transpose(1, 2)  # (1, nh, T, hs)
        k = k.view(1, -1, cfg.n_head, cfg.head_size).transpose(1, 2)  # (1, nh, T, hs)
        T = ids.size(1)
        mask = torch.ones(T, T, dtype=torch.bool, device=model.device).tril()
        by_hand = (q @ k.transpose(-2, -1) / math.sqrt(cfg.head_size)).masked_fill(
            ~mask, float("-inf")).softmax(-1)
        print("layer 0 recomputed by hand from wte, wpe, ln_1 and c_attn matches the model:",
              torch.allclose(by_hand.float(), maps[0].float(), atol=1e-5))

print("\nwhat `gpt inspect-attention --model", path, "--text ... --layer 0` prints:\n")
console = Console(width=80)
insp = attention.inspect(str(path), text=text, layer="0", head="all", device="cpu")
attention.render_terminal(console, insp)
print("labels: 'previous token' = looks at token t-1; 'induction' = after seeing A B ... A, looks")
print("at B (measured on random tokens repeated twice); 'first token / sink' = parks its weight")
print("on token 0; 'broad' = spreads it evenly. Try --html attn.html for an interactive view.")
tmp.cleanup()
