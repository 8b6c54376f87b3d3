"""Instruction fine-tuning offline, end to end: a synthetic instruction set with a held-out split,
a small base model pretrained on the bundled Shakespeare (GPT-2 tokenizer), `gpt train` on the
instructions, and held-out exact-match accuracy of greedy replies.

    python examples/instruct.py                          # full fine-tuning, prompt masked (~3 min on 2 idle cores)
    python examples/instruct.py --lora-rank 8            # LoRA adapters instead
    python examples/instruct.py --no-mask-prompt         # learn every token, prompts too
    python examples/instruct.py --compare                # all three above, one table (~6 min)
    python examples/instruct.py --base runs/my-model     # skip pretraining: fine-tune this model
    gpt chat --model runs/instruct/full-mask             # then talk to the result

Four tasks, each asked as one user turn and answered in one assistant turn:

    add      What is three plus four?                  -> seven
    reverse  Reverse the letters of w o r d.           -> d r o w
    upper    Write w o r d in capitals.                -> W O R D
    count    How many letters are in w o r d?          -> four

Held out: 20% of the addition pairs (each operand is seen in training, the pair never is) and
20% of the words (never seen in any task during training); the accuracy is on those alone.
Words are spelled with spaces so that every letter is its own GPT-2 token: a whole BPE word's
letters are invisible to a model this small. Numbers are words by default because Shakespeare
has no digits: a model pretrained on it never learned the digit tokens, and LoRA, which freezes
the embeddings, cannot teach it to write them (``--numbers digits`` shows that).

Everything goes through the command line (`gpt train` as a subprocess) and the same chat
template `gpt chat` and `gpt serve` use: each reply is ``chat.prompt_tokens`` of the question
decoded greedily by ``generate.generate`` and compared, stripped, with the answer. Results go to
stdout (a table) and ``<work>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
        "eighteen", "nineteen"]
TASKS = ("add", "reverse", "upper", "count")


def number(n: int, style: str) -> str:
    if style == "digits":
        return str(n)
    if n < 20:
        return ONES[n]
    return "twenty" + (f"-{ONES[n - 20]}" if n > 20 else "")


def corpus_words(limit: int, rng: random.Random) -> list[str]:
    """Distinct lowercase words of 3 to 6 letters from the bundled Shakespeare, shuffled."""
    from gptcli.data import bundled_corpus

    counts = Counter(re.findall(r"\b[a-z]{3,6}\b", bundled_corpus().read_text()))
    words = sorted(w for w, c in counts.items() if c >= 3)
    rng.shuffle(words)
    return words[:limit]


def question(task: str, item, style: str) -> tuple[str, str]:
    """(user message, expected reply) of one task item."""
    if task == "add":
        a, b = item
        return f"What is {number(a, style)} plus {number(b, style)}?", number(a + b, style)
    spelled = " ".join(item)
    if task == "reverse":
        return f"Reverse the letters of {spelled}.", " ".join(reversed(item))
    if task == "upper":
        return f"Write {spelled} in capitals.", spelled.upper()
    return f"How many letters are in {spelled}?", number(len(item), style)


def build_data(folder: Path, *, records: int, held_out: float, style: str, seed: int) -> dict:
    """train.jsonl (chat records of the training items, in random order) and test.json (the
    held-out questions and answers); returns counts."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(13) for b in range(13)]
    rng.shuffle(pairs)
    words = corpus_words(400, rng)
    cut_pairs, cut_words = int(len(pairs) * held_out), int(len(words) * held_out)
    test_items = {"add": pairs[:cut_pairs], "words": words[:cut_words]}
    train_items = {"add": pairs[cut_pairs:], "words": words[cut_words:]}
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w") as f:
        for _ in range(records):
            task = rng.choice(TASKS)
            item = rng.choice(train_items["add" if task == "add" else "words"])
            user, answer = question(task, item, style)
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    test = [{"task": task, "question": q, "answer": a}
            for task in TASKS for item in test_items["add" if task == "add" else "words"]
            for q, a in [question(task, item, style)]]
    (folder / "test.json").write_text(json.dumps(test, indent=0))
    return {"train_records": records, "test_items": len(test),
            "held_out_pairs": len(test_items["add"]), "held_out_words": len(test_items["words"]),
            "train_pairs": len(train_items["add"]), "train_words": len(train_items["words"])}


def gpt(*args: object) -> None:
    """`gpt ARGS` through this interpreter (so the same installation runs it); progress shows."""
    command = [sys.executable, "-m", "gptcli", *map(str, args)]
    print("$ gpt " + " ".join(map(str, args)), file=sys.stderr, flush=True)
    subprocess.run(command, check=True)


def train_seconds(run: Path) -> tuple[int, float]:
    """(steps, seconds) of a finished run from its metrics.jsonl: the last log line's elapsed
    time (it includes the one validation at the end, --eval-steps batches)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "elapsed" in r][-1]
    return last["step"], last["elapsed"]


def evaluate(checkpoint: Path, test: list[dict], max_new_tokens: int) -> dict:
    """Held-out exact match of greedy replies, per task and overall."""
    from gptcli import chat
    from gptcli.checkpoint import read_safetensors
    from gptcli.config import SampleConfig
    from gptcli.generate import generate, load_generator

    loaded = load_generator(str(checkpoint), device="cpu", dtype="float32")
    template = chat.template_for(read_safetensors(loaded.path, tensors=False)[1])
    config = SampleConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    right, seen, examples = defaultdict(int), defaultdict(int), {}
    for item in test:
        ids = chat.prompt_tokens([{"role": "user", "content": item["question"]}],
                                 loaded.tokenizer, template)
        samples, _ = generate(loaded.model, loaded.tokenizer, ids, config)
        reply = chat.reply_content(samples[0].text, template).strip()
        ok = reply == item["answer"]
        right[item["task"]] += ok
        seen[item["task"]] += 1
        examples.setdefault(item["task"], (item["question"], item["answer"], reply))
    scores = {t: right[t] / seen[t] for t in seen}
    scores["all"] = sum(right.values()) / sum(seen.values())
    return {"template": template, "exact_match": scores, "examples": examples}


def pretrain(args, work: Path) -> Path:
    """A small GPT-2-tokenizer model on the bundled Shakespeare (reused when already there)."""
    if args.base:
        return Path(args.base)
    run = work / "base"
    if (run / "last.safetensors").exists() and not args.fresh_base:
        print(f"reusing the base model in {run} (--fresh-base trains it again)", file=sys.stderr)
        return run / "last.safetensors"
    gpt("train", "--preset", "tiny", "--tokenizer", "gpt2", "--n-layer", args.n_layer,
        "--n-head", args.n_head, "--n-embd", args.n_embd, "--context-length",
        args.context_length, "--batch-size", args.batch_size, "--max-steps", args.pretrain_steps,
        "--warmup-steps", max(1, args.pretrain_steps // 10), "--lr", "2e-3", "--min-lr", "2e-4",
        "--eval-interval", args.pretrain_steps, "--eval-steps", 5, "--sample-interval", 0,
        "--seed", args.seed, "--device", "cpu", "--out", run, "--force")
    return run / "last.safetensors"


def finetune(args, base: Path, data: Path, name: str, *, lora_rank: int, mask: bool,
             steps: int) -> Path:
    run = args.work / name
    lr = args.lr if args.lr is not None else (args.lora_lr if lora_rank else args.full_lr)
    gpt("train", "--init-from", base, "--data", data / "train.jsonl", "--out", run, "--force",
        "--max-steps", steps, "--warmup-steps", max(1, steps // 10), "--lr", lr,
        "--min-lr", lr / 10, "--batch-size", args.batch_size, "--eval-interval", steps,
        "--eval-steps", 5, "--sample-interval", 0, "--seed", args.seed, "--device", "cpu",
        "--mask-prompt" if mask else "--no-mask-prompt",
        *(["--lora-rank", lora_rank] if lora_rank else []))
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("runs/instruct"),
                   help="folder for the data, the base model and the runs (default: %(default)s)")
    p.add_argument("--base", help="fine-tune this model instead of pretraining one (it must use "
                   "the GPT-2 tokenizer)")
    p.add_argument("--fresh-base", action="store_true", help="pretrain the base again")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps (default: %(default)s)")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--context-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank; 0: full fine-tuning")
    p.add_argument("--no-mask-prompt", action="store_true", help="learn the prompts too")
    p.add_argument("--compare", action="store_true",
                   help="run full+masked, full+unmasked and LoRA+masked at equal steps")
    p.add_argument("--lr", type=float, help="fine-tuning learning rate (default: --full-lr or "
                   "--lora-lr)")
    p.add_argument("--full-lr", type=float, default=1e-3)
    p.add_argument("--lora-lr", type=float, default=3e-3)
    p.add_argument("--records", type=int, default=8000, help="training records")
    p.add_argument("--held-out", type=float, default=0.2)
    p.add_argument("--numbers", choices=("words", "digits"), default="words")
    p.add_argument("--max-new-tokens", type=int, default=8,
                   help="reply length limit (the longest answer is 7 tokens with its end)")
    p.add_argument("--eval-base", action="store_true",
                   help="also score the base model before fine-tuning (its plain layout)")
    p.add_argument("--name", help="the run folder's name under --work (default: from the "
                   "settings, e.g. full-mask, lora8-nomask)")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args()

    t0 = time.perf_counter()
    data = args.work / "data"
    counts = build_data(data, records=args.records, held_out=args.held_out, style=args.numbers,
                        seed=args.seed)
    print(f"data: {counts}", file=sys.stderr)
    test = json.loads((data / "test.json").read_text())
    base = pretrain(args, args.work)
    plans = [("full-mask", 0, True), ("full-nomask", 0, False),
             (f"lora{8 if not args.lora_rank else args.lora_rank}-mask",
              args.lora_rank or 8, True)] if args.compare else [
        (args.name or f"{'lora' + str(args.lora_rank) if args.lora_rank else 'full'}-"
         f"{'nomask' if args.no_mask_prompt else 'mask'}", args.lora_rank,
         not args.no_mask_prompt)]
    saved = args.work / "results.json"  # earlier invocations' runs stay in the table
    results = json.loads(saved.read_text()) if saved.exists() else {"runs": {}}
    if args.fresh_base or results.get("base", {}).get("path") != str(base) \
            or results.get("data") != counts:
        results = {"runs": {}, "base": {"path": str(base)}}
    if args.eval_base:
        results["base"]["exact_match"] = evaluate(base, test, args.max_new_tokens)["exact_match"]
    results.update(data=counts, settings={k: str(v) for k, v in vars(args).items()})
    for name, rank, mask in plans:
        run = finetune(args, base, data, name, lora_rank=rank, mask=mask, steps=args.steps)
        steps, seconds = train_seconds(run)
        scored = evaluate(run / "last.safetensors", test, args.max_new_tokens)
        results["runs"][name] = {"steps": steps, "train_seconds": round(seconds, 1),
                                 "lora_rank": rank, "mask_prompt": mask,
                                 "lr": args.lr or (args.lora_lr if rank else args.full_lr),
                                 **scored}
        saved.write_text(json.dumps(results, indent=1))

    print(f"held-out exact match ({counts['test_items']} items: {counts['held_out_pairs']} "
          f"unseen sums, {counts['held_out_words']} unseen words x 3 tasks)")
    print(f"{'run':<14} {'steps':>5} {'train s':>8} " + " ".join(f"{t:>7}" for t in TASKS)
          + f" {'all':>7}")
    rows = ([("base (no FT)", "-", "-", results["base"]["exact_match"])]
            if "exact_match" in results["base"] else []) + [
        (name, r["steps"], r["train_seconds"], r["exact_match"])
        for name, r in results["runs"].items()]
    for name, steps, seconds, em in rows:
        print(f"{name:<14} {steps:>5} {seconds:>8} " + " ".join(f"{em[t]:>7.1%}" for t in TASKS)
              + f" {em['all']:>7.1%}")
    for name, rank, mask in plans:
        for task, (q, a, got) in results["runs"][name]["examples"].items():
            print(f"  {name} {task}: {q!r} -> {got!r} (expected {a!r})")
    print(f"total {time.perf_counter() - t0:.0f} s; try: gpt chat --model "
          f"{args.work / plans[0][0]} --temperature 0", file=sys.stderr)


if __name__ == "__main__":
    main()
