import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gptcli import native
from gptcli.cli import app
from gptcli.config import SampleConfig
from gptcli.model import GPT
from gptcli.decode import decode_loop
from gptcli.kv_cache import window_start
from gptcli.generate import generate, prompt_ids
from gptcli.sampling import (GREEDY_BELOW, apply_repetition_penalty, filter_min_p, filter_top_k,
                             filter_top_p, most_likely, next_token)
from gptcli.tokenizer import CharTokenizer, GPT2Tokenizer

from conftest import randomize_, tiny_config

runner = CliRunner()


def greedy(n, **kw):
    return SampleConfig(max_new_tokens=n, temperature=0, **kw)


def full_recompute(model, prompt, n):
    """Reference: no cache, the whole window recomputed for every token."""
    idx = prompt
    with torch.no_grad():
        for _ in range(n):
            start = window_start(idx.size(1), model.config.context_length)
            idx = torch.cat([idx, model(idx[:, start:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx[:, prompt.size(1):]


@pytest.mark.parametrize("options", [dict(), dict(position="rope"), dict(position="sinusoidal")])
def test_kv_cache_greedy_equals_full_recomputation_across_window_slides(options):
    model = randomize_(GPT(tiny_config(**options))).eval()
    prompt = torch.randint(0, 101, (2, 20))
    n = 70  # context 32: the window slides several times
    cached = torch.stack(list(decode_loop(model, prompt, greedy(n))), dim=1)
    assert torch.equal(cached, full_recompute(model, prompt, n))


def test_greedy_equals_transformers_generate():
    pytest.importorskip("transformers", reason="parity needs transformers")
    from test_model import hf_pair

    hf, ours = hf_pair(dict(vocab_size=101, n_positions=64, n_embd=48, n_layer=2, n_head=3))
    prompt = torch.randint(0, 101, (1, 6))
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False,
                               pad_token_id=0)[:, 6:]
    got = torch.stack(list(decode_loop(ours, prompt, greedy(40))), dim=1)
    assert got.tolist() == expected.tolist()


def test_window_start():
    assert window_start(32, 32) == 0
    assert window_start(33, 32) == 8
    assert window_start(40, 32) == 8
    assert window_start(41, 32) == 16


def test_sample_draws_each_index_as_often_as_its_weight_and_never_a_zero_one():
    """``sample`` (the inverse of the cumulative sum at one uniform number a row) against the
    weights it is given, unnormalised and with zeros at both ends and inside: a chi-square test
    over 60,000 draws with a fixed seed (5 degrees of freedom: 20.5 is the 0.1% point), and
    weight 0 never drawn, even where the uniform number rounds to the row's sum."""
    from gptcli.sampling import sample

    weights = torch.tensor([0.0, 3.0, 1.0, 0.0, 0.5, 2.0, 0.25, 6.0, 0.0])
    n = 60_000
    drawn = sample(weights.expand(n, -1), torch.Generator().manual_seed(0))
    assert drawn.shape == (n,) and drawn.dtype == torch.long
    counts = torch.bincount(drawn, minlength=9).double()
    assert counts[weights == 0].sum() == 0
    expected = n * weights[weights > 0].double() / weights.sum()
    chi2 = ((counts[weights > 0] - expected) ** 2 / expected).sum().item()
    assert chi2 < 20.5, chi2
    # one row with all of its weight on the last index, one on the first: nothing else, ever
    edge = torch.tensor([[0.0, 0.0, 1e-30], [1.0, 0.0, 0.0]]).repeat(500, 1)
    got = sample(edge, torch.Generator().manual_seed(1)).view(500, 2)
    assert (got[:, 0] == 2).all() and (got[:, 1] == 0).all()
    for bad in ([0.0, 0.0], [1.0, float("nan")], [1.0, float("inf")]):  # as multinomial: refused
        with pytest.raises(ValueError, match="positive, finite sum"):
            sample(torch.tensor([[1.0, 1.0], bad]), torch.Generator().manual_seed(0))


def test_top_k_and_top_p_on_hand_made_logits():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda t: torch.isfinite(t)[0].tolist()  # noqa: E731
    assert kept(filter_top_k(logits, 2)) == [True, True, False, False, False]
    assert kept(filter_top_p(logits, 0.5)) == [True, False, False, False, False]
    assert kept(filter_top_p(logits, 0.6)) == [True, True, False, False, False]
    assert kept(filter_top_p(logits, 0.86)) == [True, True, True, True, False]
    assert kept(filter_top_p(logits, 1.0)) == [True] * 5
    shuffled = logits[:, [3, 0, 4, 2, 1]]  # order must not matter
    assert kept(filter_top_p(shuffled, 0.6)) == [False, True, False, False, True]


def test_repetition_penalty_on_hand_made_logits():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 3.0, 0.5]]


def draws(logits: torch.Tensor, n: int = 4000, **settings) -> torch.Tensor:
    """``n`` seeded draws from one row of logits under ``settings`` (as token ids)."""
    g = torch.Generator().manual_seed(0)
    cfg = SampleConfig(**{"temperature": 1.0, **settings})
    seen = torch.zeros(n, 0, dtype=torch.long)
    return next_token(logits.expand(n, -1), cfg, seen, g)


def test_min_p_never_draws_below_its_share_of_the_top_token():
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    logits = torch.log(probs)[None]
    kept = torch.isfinite(filter_min_p(logits, 0.3))[0].tolist()
    assert kept == [True, True, True, False, False]  # at least 0.3 * 0.4 = 0.12
    got = draws(logits, min_p=0.3)
    assert set(got.tolist()) == {0, 1, 2}  # never 3 or 4, and not only the top token
    # min-p comes after temperature: at 2 the ratios to the top are square-rooted, so 0.1 (a
    # quarter of the top) is half of it after temperature and passes min-p 0.4; 0.05 does not
    assert set(draws(logits, min_p=0.4, temperature=2.0).tolist()) == {0, 1, 2, 3}
    assert set(draws(logits, min_p=0.4).tolist()) == {0, 1}
    assert torch.equal(filter_min_p(logits, 0.0), logits)
    assert torch.isfinite(filter_min_p(logits, 1.0))[0].tolist() == [True] + [False] * 4


def test_extreme_settings_and_broken_logits_never_raise():
    """Settings at the edge of what SampleConfig allows, and logits a broken model (or an
    overflowing division) makes: always a token, by the rules in sampling's docstring."""
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0]] * 2)
    seen = torch.tensor([[1, 3]] * 2)
    top = logits.argmax(-1)
    for tiny in (1e-300, 1e-39, GREEDY_BELOW / 2):  # below float32's range, then just greedy
        assert torch.equal(next_token(logits, SampleConfig(temperature=tiny), seen[:, :0], g),
                           top)
        assert torch.equal(next_token(logits, SampleConfig(top_p=tiny), seen[:, :0], g), top)
    assert torch.equal(next_token(logits * 1e30, SampleConfig(temperature=GREEDY_BELOW),
                                  seen[:, :0], g), top)  # overflows to inf: still the top
    for penalty in (0.01, 100.0):  # the extremes allowed, on repeated tokens
        next_token(logits, SampleConfig(repetition_penalty=penalty, temperature=1e-5), seen, g)
    nan, inf = float("nan"), float("inf")
    broken = torch.tensor([[nan, 1.0, nan, 0.0], [1.0, inf, 2.0, inf], [nan] * 4,
                           [-inf] * 4, [inf, -inf, nan, 5.0]])
    empty = torch.zeros(5, 0, dtype=torch.long)
    for cfg in (SampleConfig(temperature=0), SampleConfig(temperature=1.0),
                SampleConfig(temperature=0.7, top_k=2, top_p=0.5, min_p=0.1)):
        picks = torch.stack([next_token(broken, cfg, empty, g) for _ in range(200)])
        assert set(picks[:, 0].tolist()) <= {1, 3}  # NaN is never picked
        assert set(picks[:, 1].tolist()) <= {1, 3}  # +inf tokens take it all
        assert set(picks[:, 4].tolist()) == {0}
        assert picks[:, 2:4].min() >= 0 and picks[:, 2:4].max() < 4  # nothing usable: any id
    assert "1e-5" in SampleConfig.model_fields["temperature"].description and GREEDY_BELOW == 1e-5


def test_most_likely_is_torch_argmax():
    """The greedy pick (numpy's argmax on a CPU) is torch's argmax: the first of equal values,
    -inf rows at 0, a padded vocabulary's slice, ids as int64, other dtypes left to torch."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 50304, generator=g)
    logits[1, 7] = logits[1, 9] = logits[1, 50300] = 100.0  # ties: the first
    logits[2] = float("-inf")
    logits[3, 50280] = 1e9  # beyond the slice below
    for scores in (logits, logits[:, :50257], logits[:1], logits.bfloat16(), logits.double()):
        with torch.inference_mode():
            picked = most_likely(scores)
        assert picked.dtype is torch.int64 and torch.equal(picked, scores.argmax(dim=-1))
    assert most_likely(logits[:, :50257])[1:4].tolist() == [7, 0, logits[3, :50257].argmax()]


def test_the_c_greedy_pick_is_torch_argmax_and_leaves_broken_rows_to_python(monkeypatch):
    """``native.argmax`` (a greedy token's pick in one C call) is torch's argmax: the first of
    equal values, vector tails, a padded vocabulary's slice; a row with a NaN, +inf or nothing
    finite, another dtype, or no library loaded: None, and next_token's own code picks."""
    native.library()
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 50304, generator=g)
    logits[1, 7] = logits[1, 9] = logits[1, 50300] = 100.0  # ties: the first
    logits[2, 50290] = logits[2, 40] = -1e30
    logits[3, 50280] = 1e9  # beyond the slice below
    for scores in (logits, logits[:, :50257], logits[1:2], logits[:, :1], logits[:, 3:20],
                   logits[:, :33]):
        assert torch.equal(native.argmax(scores), scores.argmax(dim=-1))
    assert native.argmax(logits[:, :50257])[1].item() == 7
    nan, inf = float("nan"), float("inf")
    for bad in (nan, inf):
        for at in (0, 5, 50256):  # in the vector loop and its tail
            broken = logits[:, :50257].clone()
            broken[2, at] = bad
            assert native.argmax(broken) is None
    assert native.argmax(torch.full((2, 40), -inf)) is None
    assert native.argmax(logits.bfloat16()) is None and native.argmax(logits.double()) is None
    picks = []
    argmax = native.argmax
    monkeypatch.setattr(native, "argmax", lambda s: (picks.append(s.shape), argmax(s))[1])
    greedy, empty = SampleConfig(temperature=0), torch.zeros(4, 0, dtype=torch.long)
    assert torch.equal(next_token(logits, greedy, empty, None, 50257),
                       logits[:, :50257].argmax(dim=-1)) and picks == [(4, 50257)]
    monkeypatch.setattr(native, "_loaded", None)
    assert argmax(logits) is None
    assert torch.equal(next_token(logits, greedy, empty, None), logits.argmax(dim=-1))


def test_top_k_1_equals_greedy_and_seed_reproduces():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    seen = torch.zeros(4, 0, dtype=torch.long)
    top1 = next_token(logits, SampleConfig(temperature=1.5, top_k=1), seen, g)
    assert torch.equal(top1, logits.argmax(-1))
    model = randomize_(GPT(tiny_config())).eval()
    tok = CharTokenizer([chr(ord("A") + i % 60) if i < 60 else chr(200 + i) for i in range(101)])
    cfg = SampleConfig(max_new_tokens=30, temperature=1.0, top_p=0.9, seed=7, num_samples=2)
    a, _ = generate(model, tok, [1, 2, 3], cfg)
    b, _ = generate(model, tok, [1, 2, 3], cfg)
    c, _ = generate(model, tok, [1, 2, 3], cfg.model_copy(update={"seed": 8}))
    assert [s.token_ids for s in a] == [s.token_ids for s in b] != [s.token_ids for s in c]


def eot_model(eot_at: int, vocab=101):
    """A model that always predicts token 5, except at position eot_at where it predicts 0."""
    model = GPT(tiny_config(vocab_size=vocab, position="learned"))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.ln_f.weight.fill_(1.0)
        model.wpe.weight[:, 0] = 1.0
        model.wpe.weight[eot_at, 1] = 10.0
        model.lm_head = torch.nn.Linear(48, vocab, bias=False)
        model.lm_head.weight.zero_()
        model.lm_head.weight[5, 0] = 1.0
        model.lm_head.weight[0, 1] = 1.0
    return model.eval()


def test_end_of_text_and_stop_strings():
    tok = CharTokenizer(list("\x00abcdefghij") + [chr(300 + i) for i in range(89)])

    class WithEot(CharTokenizer):
        eot_id = 0

    eot_tok = WithEot(tok.chars)
    samples, stats = generate(eot_model(eot_at=6), eot_tok, [1, 2], greedy(20))
    assert samples[0].finish_reason == "eos" and samples[0].text == "eeeee"
    assert stats.new_tokens == 6
    samples, _ = generate(eot_model(eot_at=6), eot_tok, [1, 2], greedy(20, ignore_eos=True))
    assert samples[0].finish_reason == "length" and len(samples[0].token_ids) == 20
    pieces = []
    samples, _ = generate(eot_model(eot_at=30), tok, [1, 2], greedy(20, stop=["eee"]),
                          on_text=lambda i, p: pieces.append(p))
    assert samples[0].finish_reason == "stop" and samples[0].text == "" and pieces == []


def test_streamed_pieces_never_split_a_character():
    from gptcli.generate import TextStream

    tok = GPT2Tokenizer()
    text = "naïve café 🙂 日本語"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # some tokens are partial characters
    stream = TextStream(tok, stop=[], eot_id=tok.eot_id)
    pieces = [stream.push(t) for t in ids] + [stream.close()]
    assert stream.text == text and "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces) and len([p for p in pieces if p]) > 3


def test_stop_strings_are_held_back_until_they_cannot_match():
    from gptcli.generate import TextStream

    tok = CharTokenizer(list("abcXY"))
    stream = TextStream(tok, stop=["XY"], eot_id=None)
    pieces = [stream.push(t) for t in tok.encode("abXaX")]
    assert pieces == ["", "a", "b", "X", "a"]  # the last len("XY") - 1 characters wait
    assert stream.push(tok.encode("Y")[0]) == "" and stream.finish_reason == "stop"
    assert stream.text == "abXa"


def test_prompt_helpers():
    tok = CharTokenizer.from_text("ab\n")
    assert prompt_ids(tok, "", 8) == (tok.encode("\n"), None)
    assert prompt_ids(GPT2Tokenizer(), "", 8) == ([50256], None)
    ids, warning = prompt_ids(tok, "ab" * 10, 8)
    assert ids == tok.encode("ab" * 4)
    assert warning == "the prompt has 20 tokens, more than the model's context of 8; keeping the last 8"


# ----------------------------------------------------------------------------- CLI

def gen(*args, input=None):
    return runner.invoke(app, ["generate", *args], input=input)


def test_cli_streams_text_and_prints_stats(char_checkpoint):
    result = gen("--model", str(char_checkpoint), "--prompt", "abc", "--max-new-tokens", "40",
                 "--seed", "1", "--device", "cpu")
    assert result.exit_code == 0, result.output
    from gptcli.checkpoint import load_checkpoint

    model, tok, _ = load_checkpoint(char_checkpoint)
    samples, _ = generate(model, tok, tok.encode("abc"), SampleConfig(max_new_tokens=40, seed=1))
    assert len(samples[0].text) == 40
    assert result.stdout == "abc" + samples[0].text + "\n"  # the prompt, then the new text
    assert "3 prompt tokens, 40 new tokens" in result.stderr and "tokens/s" in result.stderr
    one = gen("--model", str(char_checkpoint), "--prompt", "a", "--max-new-tokens", "1",
              "--device", "cpu")  # one of each; no speed after the first token, with none
    assert "[1 prompt token, 1 new token, first token " in one.stderr
    assert "tokens/s" not in one.stderr


def read_within(pipe, n: int, seconds: float) -> bytes:
    """Up to ``n`` bytes from ``pipe``, or what arrived within ``seconds`` (so a command that
    does not stream fails the test instead of hanging it)."""
    import os
    import select
    import time

    data, deadline = b"", time.time() + seconds
    while len(data) < n and time.time() < deadline:
        ready, _, _ = select.select([pipe], [], [], max(0.0, deadline - time.time()))
        if not ready:
            break
        chunk = os.read(pipe.fileno(), n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_cli_streams_as_tokens_arrive(char_checkpoint):
    """Text reaches stdout while generation is still going, not all at the end."""
    proc = subprocess.Popen([sys.executable, "-m", "gptcli", "generate", "--model",
                             str(char_checkpoint), "--prompt", "abc", "--max-new-tokens",
                             "1000000", "--seed", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        first = read_within(proc.stdout, 50, seconds=60)  # long before a million tokens
        assert first.startswith(b"abc") and len(first) == 50
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.communicate()


def test_cli_streams_several_samples_one_after_another(char_checkpoint):
    """--num-samples N decodes the samples as one batch and streams the first at once (the
    others follow it), rather than printing everything at the end."""
    proc = subprocess.Popen([sys.executable, "-m", "gptcli", "generate", "--model",
                             str(char_checkpoint), "--prompt", "abc", "--max-new-tokens",
                             "1000000", "--seed", "1", "--num-samples", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = read_within(proc.stdout, 60, seconds=60)
        assert first.startswith(b"----- sample 1/3 -----\nabc") and len(first) == 60
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize("stop", [[], ["--stop", "e"]])
def test_cli_several_samples_each_whole_and_in_order(char_checkpoint, stop):
    """Samples that finish at different steps (a stop string) still come out whole, in order,
    each under its header, equal to the library's."""
    result = gen("--model", str(char_checkpoint), "--prompt", "abc", "--max-new-tokens", "30",
                 "--seed", "4", "--num-samples", "3", *stop)
    assert result.exit_code == 0, result.output
    from gptcli.checkpoint import load_checkpoint

    model, tok, _ = load_checkpoint(char_checkpoint)
    samples, _ = generate(model, tok, tok.encode("abc"),
                          SampleConfig(max_new_tokens=30, seed=4, num_samples=3, stop=stop[1:]))
    assert len({len(s.text) for s in samples}) > 1 or not stop  # they did end apart
    expected = "".join(f"{'' if i == 0 else chr(10)}----- sample {i + 1}/3 -----\nabc{s.text}"
                       for i, s in enumerate(samples))
    assert result.stdout == expected + "\n"


def test_min_p_0_leaves_seeded_output_unchanged(char_checkpoint):
    common = ["--model", str(char_checkpoint), "--prompt", "abc", "--max-new-tokens", "200",
              "--seed", "4", "--temperature", "1.3", "--top-p", "0.95"]
    absent = gen(*common)
    assert absent.exit_code == 0, absent.output
    assert gen(*common, "--min-p", "0").stdout == absent.stdout  # byte for byte
    assert gen(*common, "--min-p", "0.9").stdout != absent.stdout  # the flag reaches sampling


def test_cli_json_and_piped_stdin(char_checkpoint):
    result = gen("--model", str(char_checkpoint), "--max-new-tokens", "25", "--temperature", "0",
                 "--num-samples", "2", "--json", input="hello")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    tok = CharTokenizer.from_text("abcdefghij klmnopqrstuvwxyz.\n")
    assert out["prompt_token_ids"] == tok.encode("hello")
    assert len(out["samples"]) == 2 and out["samples"][0] == out["samples"][1]  # greedy
    sample = out["samples"][0]
    assert len(sample["token_ids"]) == 25 and sample["finish_reason"] == "length"
    assert sample["text"] == tok.decode(sample["token_ids"])
    assert out["stats"]["new_tokens"] == 25 and out["stats"]["decode_tokens_per_s"] > 0


def test_cli_real_subprocess_pipe(char_checkpoint):
    out = subprocess.run([sys.executable, "-m", "gptcli", "generate", "--model",
                          str(char_checkpoint), "--prompt", "-", "--max-new-tokens", "5",
                          "--temperature", "0"], input="abc", capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("abc") and "prompt tokens" in out.stderr


@pytest.mark.parametrize("args,message", [
    (["--temperature", "-1"], "error: --temperature must be at least 0, got -1.0"),
    (["--top-p", "0"], "error: --top-p must be greater than 0, got 0.0"),
    (["--top-p", "1.5"], "error: --top-p must be at most 1, got 1.5"),
    (["--top-k", "-3"], "error: --top-k must be at least 0, got -3"),
    (["--min-p", "1.5"], "error: --min-p must be at most 1, got 1.5"),
    (["--temperature", "inf"], "error: --temperature must be a finite number, got inf"),
    (["--repetition-penalty", "0"], "error: --repetition-penalty must be at least 0.01, got 0.0"),
    (["--max-new-tokens", "0"], "error: --max-new-tokens must be at least 1, got 0"),
    (["--stop", ""], "error: --stop must not be an empty string (it would stop at once)"),
    (["--seed", "99999999999999999999"],
     "error: --seed must be less than 9223372036854775808, got 99999999999999999999"),
    (["--seed", "-1"], "error: --seed must be at least 0, got -1"),
    (["--prompt", "xyz!"], "error: the text has 1 character(s) outside this model's"),
    (["--prompt-file", "nope.txt"], "error: cannot read prompt file nope.txt: it does not exist"),
    (["--prompt-file", "."], "error: cannot read prompt file .: it is a folder"),
    (["--prompt-file", "latin.txt"], "error: prompt file latin.txt is not UTF-8 text (byte offset 3)"),
    (["--prompt", "x", "--prompt-file", "latin.txt"],
     "error: give the prompt with either --prompt TEXT or --prompt-file FILE"),
    (["--prompt", "x", "--interactive"],
     "error: --interactive reads each prompt as a line of input; leave out --prompt"),
    (["--prompt-file", "latin.txt", "-i"],
     "error: --interactive reads each prompt as a line of input; leave out --prompt-file"),
])
def test_cli_bad_input(char_checkpoint, args, message, tmp_path):
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9")
    result = gen("--model", str(char_checkpoint), *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_unknown_model_lists_what_is_available(char_checkpoint, isolated_home):
    (isolated_home / "models").mkdir(parents=True)
    (isolated_home / "models" / "gpt2.safetensors").write_bytes(char_checkpoint.read_bytes())
    result = gen("--model", "gpt3", "--prompt", "a")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: no model named 'gpt3': it is not a file, a run folder or a downloaded model "
        f"(looked for a file or run folder {Path.cwd() / 'gpt3'} and a downloaded model 'gpt3' "
        f"in {isolated_home / 'models'}); available locally: gpt2")
    # a run path from the wrong folder is a path that does not exist, not a Hub id to download
    result = gen("--model", "runs/shakespeare", "--prompt", "a")
    assert result.exit_code == 2
    assert result.stderr.strip().startswith(
        f"error: runs/shakespeare does not exist (looked for a file or run folder "
        f"{Path.cwd() / 'runs' / 'shakespeare'} and ")
    assert "gpt download" not in result.stderr
    result = gen("--model", "gpt2-medium", "--prompt", "a")
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: gpt2-medium is not downloaded yet: get it with `gpt "
                                     "download gpt2-medium` (once, with network access); "
                                     "available locally: gpt2")
    result = gen("--model", "gpt2", "--prompt", "abc", "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output


def test_cli_without_model_uses_latest_run_or_explains(char_checkpoint, tmp_path):
    result = gen("--prompt", "a")
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: no --model given, and there is no trained run "
                                     "under ./runs. Train one with `gpt train`, or download one "
                                     "with `gpt download gpt2`")
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "last.safetensors").write_bytes(char_checkpoint.read_bytes())
    result = gen("--prompt", "a", "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output
    assert "using runs/x/last.safetensors (the latest run)" in result.stderr


def test_cli_interactive(char_checkpoint):
    result = gen("--model", str(char_checkpoint), "--interactive", "--max-new-tokens", "3",
                 "--temperature", "0", input="abc\nxyz.\n/quit\nnever\n")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("[3 prompt tokens") == 1 and "never" not in result.stdout
    assert "> " not in result.output  # piped lines: no prompts, stdout only the text
    assert len(result.stdout.splitlines()) == 2  # two answers, then /quit


def test_cli_interactive_feeds_what_a_prompt_shares_with_the_last_once(char_checkpoint):
    """The prompt loop keeps one engine: "abcd" after "abc" feeds only its "d" (the stats say
    what was kept) and gives what `gpt generate --prompt abcd` gives."""
    args = ["--model", str(char_checkpoint), "--max-new-tokens", "3", "--temperature", "0"]
    result = gen(*args, "--interactive", input="abc\nabcd\n")
    assert result.exit_code == 0, result.output
    assert "[3 prompt tokens, " in result.stderr and "[4 prompt tokens (3 kept), " in result.stderr
    result = gen(*args, "--interactive", "--json", input="abc\nabcd\n")
    second = json.loads(result.stdout.splitlines()[1])
    assert second["stats"]["cached_prompt_tokens"] == 3
    alone = json.loads(gen(*args, "--prompt", "abcd", "--json").stdout.strip().splitlines()[-1])
    assert second["samples"] == alone["samples"] and alone["stats"]["cached_prompt_tokens"] == 0


def test_compiled_step_matches_eager_and_compiles_once():
    import torch._dynamo
    from torch._dynamo.utils import counters

    from gptcli.decode import compile_step

    model = randomize_(GPT(tiny_config(n_layer=1, context_length=16))).eval()
    prompt = torch.randint(0, 101, (1, 3))
    cfg = greedy(30)  # several window slides at context 16
    eager = [t.item() for t in decode_loop(model, prompt, cfg)]
    torch._dynamo.reset()
    counters.clear()
    compiled = [t.item() for t in decode_loop(model, prompt, cfg, step=compile_step(model))]
    assert compiled == eager
    # Not one graph per position (17 of them here): on a CPU the cache is dynamic and the shapes
    # symbolic, so one graph serves the positions short of a full window and one the full window
    # (where the keys read are the whole buffer); on CUDA the static cache makes it one.
    assert counters["stats"]["unique_graphs"] == (1 if model.device.type == "cuda" else 2)


def test_cli_out_of_memory_suggests_what_generate_can_change(char_checkpoint, monkeypatch):
    import gptcli.generate

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(gptcli.generate, "Engine", oom)
    result = gen("--model", str(char_checkpoint), "--prompt", "abc")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: out of memory on the device; try a smaller --num-samples or --max-new-tokens, "
        "or a smaller model")


def test_the_first_compiled_calls_speed_says_it_includes_compiling(char_checkpoint, capsys):
    """--compile: the first call's tokens/s includes compiling the step (0.2 tokens/s for five
    tokens), which the stats line says; later calls (--interactive) do not."""
    from gptcli.cli.commands import generate_once
    from gptcli.generate import Loaded
    from gptcli.models import load_model

    model, tokenizer, path = load_model(str(char_checkpoint), device="cpu")
    loaded = Loaded(model, tokenizer, path, step=model)  # (any step: compiled or not)
    lines = []
    for _ in range(2):
        generate_once(loaded, "abc", greedy(3), as_json=False)
        lines.append(capsys.readouterr().err.strip().splitlines()[-1])
    assert "tokens/s with compiling]" in lines[0] and "compiling" not in lines[1]
    plain = Loaded(model, tokenizer, path)
    generate_once(plain, "abc", greedy(3), as_json=False)
    assert "compiling" not in capsys.readouterr().err
