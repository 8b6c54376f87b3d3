"""Chat turns: time to first token when the earlier turns stay in the KV cache (what `gpt chat`
and `gpt serve` do) against feeding the whole conversation again each turn (what they did
before), same model, one process.

A conversation of ``--turns`` user messages (lines of the bundled Shakespeare), each answered
with ``--reply-tokens`` greedy tokens, laid out in the model's chat template. Every turn is
generated twice through ``generate``, alternating which goes first: once through the
conversation's engine (``engine=``, as ``gpt chat``'s session holds it), once on a fresh engine.
Per turn: prompt tokens, tokens kept, time to first token both ways and their ratio; the reply
kept in the conversation is the kept run's, and a fresh run whose tokens differ is counted
(rounding: the kept positions were computed a token at a time).

With ``--conversations N`` (and ``--rows R``, the engine's rows, as `gpt serve --max-batch R`),
N conversations share the engine, as N clients of one server: each turn is the next message of
one of them, picked at random (``--seed``); the summary gives the share of prompt positions kept.

    python benchmarks/chat_turns.py --model PATH [--quantize int8] [--turns 8]
    python benchmarks/chat_turns.py --model PATH --conversations 6 --rows 4 --turns 30
"""

from __future__ import annotations

import argparse
import random
import statistics

from gptcli import chat
from gptcli.data.sources import bundled_corpus
from gptcli.checkpoint import read_safetensors
from gptcli.config import SampleConfig
from gptcli.generate import generate, load_generator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a checkpoint or model name gpt generate takes")
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--reply-tokens", type=int, default=24)
    ap.add_argument("--words", type=int, default=40, help="words in each user message")
    ap.add_argument("--conversations", type=int, default=1, help="conversations taking turns")
    ap.add_argument("--rows", type=int, default=1, help="the engine's rows")
    ap.add_argument("--seed", type=int, default=0, help="which conversation speaks when")
    args = ap.parse_args()
    loaded = load_generator(args.model, device="cpu", quantize=args.quantize)
    model, tok = loaded.model, loaded.tokenizer
    template = chat.template_for(read_safetensors(loaded.path, tensors=False)[1])
    words = bundled_corpus().read_text(encoding="utf-8").split()
    sample = SampleConfig(max_new_tokens=args.reply_tokens, temperature=0, ignore_eos=True)
    engine = loaded.engine(args.rows)
    histories: list[list[dict[str, str]]] = [[] for _ in range(args.conversations)]
    order = random.Random(args.seed)
    differ, ratios, prompted, cached = 0, [], 0, 0
    print(f"{'turn':>4} {'talk':>4} {'prompt':>6} {'kept':>5} {'fresh ms':>9} {'kept ms':>8} "
          f"{'ratio':>6}")
    for turn in range(args.turns):
        talk = turn if turn < args.conversations else order.randrange(args.conversations)
        history = histories[talk]
        message = " ".join(words[turn * args.words:(turn + 1) * args.words])
        history.append({"role": "user", "content": message})
        ids = chat.prompt_tokens(history, tok, template)
        if len(ids) + args.reply_tokens > model.config.context_length:
            print(f"turn {turn + 1} would not fit the context of {model.config.context_length}")
            break
        runs = {}
        for kind in (("fresh", "kept") if turn % 2 else ("kept", "fresh")):
            runs[kind] = generate(model, tok, ids, sample, step=loaded.step,
                                  engine=engine if kind == "kept" else None)
        (kept,), kept_stats = runs["kept"]
        differ += runs["fresh"][0][0].token_ids != kept.token_ids
        fresh_ms = runs["fresh"][1].time_to_first_token_s * 1e3
        kept_ms = kept_stats.time_to_first_token_s * 1e3
        ratios.append(fresh_ms / kept_ms)
        prompted, cached = prompted + len(ids), cached + kept_stats.cached_prompt_tokens
        print(f"{turn + 1:>4} {talk + 1:>4} {len(ids):>6} {kept_stats.cached_prompt_tokens:>5} "
              f"{fresh_ms:>9.1f} {kept_ms:>8.1f} {ratios[-1]:>5.1f}x", flush=True)
        history.append({"role": "assistant", "content": chat.reply_content(kept.text, template)})
    print(f"time to first token, fresh / kept: median {statistics.median(ratios):.1f}x over "
          f"{len(ratios)} turns; prompt positions kept: {cached}/{prompted} "
          f"({cached / max(1, prompted):.0%}); replies that differ: {differ}")


if __name__ == "__main__":
    main()
