"""Speculative decoding: a draft model changes the speed, never the output. Greedy output is the
same token for token; sampled output has the model's own distribution (chi-square tests over many
seeded rows); a draft that is the model itself keeps every proposal; the CLI refuses a draft with
another tokenizer and reports the acceptance rate."""

import json

import pytest
import torch
from typer.testing import CliRunner

from gptcli.checkpoint import save_checkpoint
from gptcli.cli import app
from gptcli.config import SampleConfig
from gptcli.decode import Engine, decode_loop
from gptcli.model import GPT
from gptcli.sampling import next_token, sample
from gptcli.speculative import Draft, accept, accept_greedy, distribution
from gptcli.tokenizer import GPT2Tokenizer

from conftest import char_tokenizer, randomize_, tiny_config

runner = CliRunner()


def pair(vocab_size: int = 101, **draft_options):
    """A tiny model and a smaller draft with other random weights (context 16 against 32 by
    default, so both windows slide, at different times)."""
    target = randomize_(GPT(tiny_config(vocab_size=vocab_size)), seed=5).eval()
    options = dict(vocab_size=vocab_size, n_layer=1, n_embd=24, n_head=2, context_length=16)
    small = randomize_(GPT(tiny_config(**{**options, **draft_options})), seed=6).eval()
    return target, small


def tokens(model, prompt, config, draft=None, counts=None) -> list[list[int]]:
    return torch.stack(list(decode_loop(model, prompt, config, draft=draft, counts=counts)),
                       dim=1).tolist()


SETTINGS = [dict(temperature=1.0), dict(temperature=0.7, top_k=5),
            dict(temperature=1.3, top_p=0.8), dict(temperature=1.0, min_p=0.2),
            dict(temperature=0.9, repetition_penalty=1.5, top_k=20, top_p=0.95, min_p=0.05),
            dict(temperature=0), dict(temperature=0, repetition_penalty=0.5)]


@pytest.mark.parametrize("settings", [s for s in SETTINGS if s["temperature"]])
def test_draws_from_distribution_are_next_tokens_draws(settings):
    """``distribution`` is what ``next_token`` samples from, filters and all: the same seed
    gives the same tokens. Greedy decoding draws from none (it compares picks)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g) * 3
    seen = torch.randint(0, 40, (64, 7), generator=g)
    config = SampleConfig(**settings)
    probs = distribution(logits, config, seen, vocab_size=40)
    assert probs.shape == (64, 40) and torch.allclose(probs.sum(-1), torch.ones(64))
    expected = next_token(logits, config, seen, torch.Generator().manual_seed(1), vocab_size=40)
    assert torch.equal(sample(probs, torch.Generator().manual_seed(1)), expected)
    with pytest.raises(ValueError, match="greedy"):
        distribution(logits, SampleConfig(temperature=0), seen)


@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("options", [dict(), dict(position="rope")])
def test_greedy_output_is_token_identical_with_and_without_a_draft(k, options):
    """Two rows (they accept different numbers of proposals, so they drift apart in position),
    70 tokens past a context of 32 (the model's window slides; the draft's, of 16, more often),
    with and without a repetition penalty."""
    target = randomize_(GPT(tiny_config(**options)), seed=5).eval()
    small = randomize_(GPT(tiny_config(n_layer=1, n_embd=24, n_head=2, context_length=16,
                                       **options)), seed=6).eval()
    prompt = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(2))
    for penalty in (1.0, 1.3):
        config = SampleConfig(max_new_tokens=70, temperature=0, repetition_penalty=penalty)
        counts: dict = {}
        assert tokens(target, prompt, config, Draft(small, k), counts) == \
            tokens(target, prompt, config)
        assert counts["proposed"] > 0


def test_a_compiled_draft_step_decodes_as_the_draft_does():
    """A draft with its compiled step (``--compile``: a torch.compile'd module, here with the
    eager backend, which compiles in no time) gives the same greedy output."""
    target, small = pair()
    prompt = torch.randint(0, 101, (1, 20), generator=torch.Generator().manual_seed(3))
    config = SampleConfig(max_new_tokens=30, temperature=0)
    compiled = Draft(small, 3, torch.compile(small, backend="eager", dynamic=True))
    assert compiled.stepper is compiled.step and Draft(small, 3).stepper is small
    assert tokens(target, prompt, config, compiled) == tokens(target, prompt, config)


def test_a_draft_that_guesses_well_is_kept_and_saves_forwards():
    """A draft that is the model itself: every proposal is kept (greedy and sampled), and each
    model forward gives k + 1 tokens."""
    target, _ = pair()
    prompt = torch.randint(0, 101, (1, 5), generator=torch.Generator().manual_seed(3))
    for temperature in (0.0, 1.0):
        config = SampleConfig(max_new_tokens=21, temperature=temperature)
        calls = []
        target.register_forward_pre_hook(lambda m, a: calls.append(1))
        counts: dict = {}
        list(decode_loop(target, prompt, config, draft=Draft(target, 4), counts=counts,
                         generator=torch.Generator().manual_seed(0)))
        target._forward_pre_hooks.clear()
        assert counts == {"proposed": 16, "accepted": 16}
        # the prefill, then 4 rounds of 4 proposals and 1 verification: the draft's 4 forwards
        # (a catch-up, 3 proposals) and the model's one
        assert len(calls) == 2 + 4 * 5


def chi_square_p(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """The p-value of Pearson's test of ``counts`` against ``expected`` (cells expecting fewer
    than 5 are pooled), from the chi-square survival function (torch's upper incomplete
    gamma)."""
    small = expected < 5
    counts = torch.cat([counts[~small], counts[small].sum(0, keepdim=True)])
    expected = torch.cat([expected[~small], expected[small].sum(0, keepdim=True)])
    keep = expected > 0
    counts, expected = counts[keep], expected[keep]
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor(float(len(expected) - 1))
    return torch.special.gammaincc(dof / 2, stat / 2).item()


def exact(model, prompt: list[int], config: SampleConfig, vocab: int):
    """The model's own distributions (after the filters) of the first token, the first two,
    and the third, by enumerating every prefix."""
    def dist(prefixes):
        with torch.no_grad():
            logits = model(torch.tensor(prefixes))[:, -1]
        return distribution(logits, config, torch.tensor(prefixes), vocab)

    p1 = dist([prompt])[0]  # (V,)
    p2 = dist([prompt + [a] for a in range(vocab)])  # (V, V): [first, second]
    joint = p1[:, None] * p2
    p3 = dist([prompt + [a, b] for a in range(vocab) for b in range(vocab)])  # (V*V, V)
    third = (joint.reshape(-1, 1) * p3).sum(0)
    return joint, third


@pytest.mark.parametrize("settings", [dict(temperature=1.0),
                                      dict(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05,
                                           repetition_penalty=1.4)])
def test_sampled_tokens_keep_the_models_distribution(settings):
    """4,000 rows sample three tokens with a draft that proposes 2 (the first token comes from
    the prefill; the second and third from rounds, where proposals are kept or replaced): the
    pairs (first, second) and the third token follow the model's own distributions, while the
    draft's alone would fail the same test."""
    vocab, n = 8, 4000
    target, small = pair(vocab_size=vocab)
    config = SampleConfig(max_new_tokens=3, **settings)
    prompt = [1, 5, 2]
    joint, third = exact(target, prompt, config, vocab)
    engine = Engine(target, n, vocab_size=vocab, draft=Draft(small, 2))
    rows = engine.add([prompt] * n, config, torch.Generator().manual_seed(0), group="one")
    for step in range(3):
        engine.pick()
        if step < 2:
            engine.advance()
    got = torch.tensor([r.tokens[3:] for r in rows])
    pairs = torch.bincount(got[:, 0] * vocab + got[:, 1], minlength=vocab * vocab).float()
    assert chi_square_p(pairs, joint.flatten() * n) > 1e-3
    assert chi_square_p(torch.bincount(got[:, 2], minlength=vocab).float(), third * n) > 1e-3
    assert 0.2 < engine.accepted / engine.proposed < 0.95  # the test saw both branches
    draft_joint, _ = exact(small, prompt, config, vocab)  # the test can tell them apart
    assert chi_square_p(pairs, draft_joint.flatten() * n) < 1e-6


def test_accept_keeps_proposals_until_the_first_miss():
    """Hand-made distributions: kept while r < p/q; the replacement comes from max(0, p - q)."""
    p = torch.tensor([[[0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]])  # (1, K+1=3, 3)
    q = torch.tensor([[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]])  # proposals 1 (kept), 0 (p/q=1/2)
    proposed = torch.tensor([[1, 0]])
    outcomes = [accept(p, q, proposed, torch.Generator().manual_seed(s)) for s in range(200)]
    kept = [int(n) for n, _ in outcomes]
    assert set(kept) == {1, 2} and 60 < kept.count(2) < 140  # the second kept half the time
    assert {int(t) for n, t in outcomes if n == 1} == {1}  # max(0, p - q) = token 1 only
    assert {int(t) for n, t in outcomes if n == 2} == {2}  # all kept: one more from p_K


def test_greedy_acceptance_keeps_the_proposals_the_model_would_have_picked():
    """Greedy: kept up to the first proposal that is not the model's pick after the same prefix
    (a later match counts for nothing); then the model's own pick."""
    picks = torch.tensor([[1, 2, 0], [1, 2, 0], [1, 2, 0], [1, 2, 0]])  # the model's, (B, K+1)
    proposed = torch.tensor([[1, 0], [1, 2], [0, 2], [2, 1]])
    n, token = accept_greedy(picks, proposed)
    assert n.tolist() == [1, 2, 0, 0] and token.tolist() == [2, 0, 1, 1]


# ----------------------------------------------------------------------------- the CLI

def gen(*args):
    return runner.invoke(app, ["generate", *args])


def save(path, tokenizer, **config):
    model = randomize_(GPT(tiny_config(vocab_size=tokenizer.vocab_size, **config)), seed=3)
    return str(save_checkpoint(path, model, tokenizer))


def test_cli_generates_with_a_draft_and_reports_its_acceptance(tmp_path):
    tok = char_tokenizer(60)
    target = save(tmp_path / "big.safetensors", tok)
    small = save(tmp_path / "small.safetensors", tok, n_layer=1, context_length=8)
    args = ["--model", target, "--prompt", tok.decode([1, 2, 3]), "--max-new-tokens", "30",
            "--temperature", "0"]
    plain = gen(*args, "--json")
    result = gen(*args, "--json", "--draft-model", small, "--draft-tokens", "3")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["samples"] == json.loads(plain.stdout.strip().splitlines()[-1])["samples"]
    stats = out["stats"]
    assert stats["draft_tokens"] > 0 and 0 <= stats["acceptance_rate"] <= 1
    assert stats["acceptance_rate"] == stats["accepted_tokens"] / stats["draft_tokens"]
    result = gen(*args, "--draft-model", target)
    assert result.exit_code == 0, result.output
    assert "draft tokens accepted 100% (" in result.stderr
    result = gen(*args[:-2], "--temperature", "0.8", "--num-samples", "3", "--seed", "1",
                 "--json", "--draft-model", small)  # rows that keep different numbers
    assert result.exit_code == 0, result.output
    samples = json.loads(result.stdout.strip().splitlines()[-1])["samples"]
    assert [len(s["token_ids"]) for s in samples] == [30, 30, 30]


def test_cli_refuses_a_draft_with_another_tokenizer(tmp_path):
    target = save(tmp_path / "big.safetensors", char_tokenizer(60))
    other = save(tmp_path / "other.safetensors", char_tokenizer(61))
    result = gen("--model", target, "--draft-model", other, "--prompt", "\u0101")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: the draft model other uses another char vocabulary than the model big; a "
        "draft model must share the model's tokenizer")
    words = save(tmp_path / "words.safetensors", GPT2Tokenizer())
    result = gen("--model", target, "--draft-model", words, "--prompt", "\u0101")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: the draft model words uses the gpt2 tokenizer and the model big the char one; a "
        "draft model must share the model's tokenizer")
    result = gen("--model", target, "--draft-model", str(tmp_path / "none.safetensors"),
                 "--prompt", "\u0101")
    assert result.exit_code == 2  # said to be the draft's, before the model is loaded
    assert result.stderr.strip() == (
        f"error: --draft-model: checkpoint {tmp_path / 'none.safetensors'} does not exist")
    result = gen("--model", target, "--draft-tokens", "3", "--prompt", "\u0101")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --draft-tokens goes with --draft-model"


def test_a_kept_engine_reports_each_calls_own_draft_tokens():
    """generate() on an engine kept between calls (gpt chat's) reports each call's draft
    tokens and acceptances, as the same call on a fresh engine does."""
    from gptcli.generate import generate

    tok = char_tokenizer(101)
    target, small = pair()
    config = SampleConfig(max_new_tokens=12, temperature=0)
    engine = Engine(target, 1, vocab_size=tok.vocab_size, draft=Draft(small, 3))
    prompt, held = [1, 2, 3], 0
    for _ in range(2):
        (kept,), stats = generate(target, tok, prompt, config, engine=engine)
        (fresh,), alone = generate(target, tok, prompt, config, draft=Draft(small, 3))
        assert kept.token_ids == fresh.token_ids and alone.draft_tokens > 0
        assert (stats.draft_tokens, stats.accepted_tokens) == (alone.draft_tokens,
                                                               alone.accepted_tokens)
        assert stats.cached_prompt_tokens == held
        prompt = prompt + kept.token_ids + [4]
        held = len(prompt) - 2  # the call's prompt and tokens, but its last token
