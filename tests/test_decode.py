"""The decode engine: rows that join and leave at different times decode exactly as alone."""

import pytest
import torch

from gptcli.config import SampleConfig
from gptcli.decode import Engine, decode_loop
from gptcli.model import GPT
from gptcli.speculative import Draft

from conftest import randomize_, tiny_config

GREEDY = SampleConfig(max_new_tokens=1, temperature=0)


def alone(model, prompt: list[int], n: int) -> list[int]:
    config = GREEDY.model_copy(update={"max_new_tokens": n})
    return [t.item() for t in decode_loop(model, torch.tensor([prompt]), config)]


@pytest.mark.parametrize("speculative", [False, True])
@pytest.mark.parametrize("options", [dict(), dict(position="rope"), dict(position="sinusoidal")])
def test_rows_joining_and_leaving_decode_as_they_would_alone(options, speculative):
    """Requests arrive at different steps (so they sit at different positions), finish at
    different steps (so rows move in the cache), and outgrow the context of 32 (so their
    windows slide at different times): each row's greedy tokens equal its solo run. With a
    draft model too (its rows move with the model's; a draft that is the model itself, so
    proposals are kept and rows run ahead of what they hand out)."""
    torch.manual_seed(0)
    model = randomize_(GPT(tiny_config(**options)), seed=5).eval()
    draft = Draft(model, 3) if speculative else None
    g = torch.Generator().manual_seed(1)
    requests = [  # (arrives at step, prompt, tokens wanted)
        (0, torch.randint(0, 101, (5,), generator=g).tolist(), 50),
        (3, torch.randint(0, 101, (9,), generator=g).tolist(), 12),
        (7, torch.randint(0, 101, (2,), generator=g).tolist(), 45),
        (9, torch.randint(0, 101, (30,), generator=g).tolist(), 20),
    ]
    expected = [alone(model, prompt, n) for _, prompt, n in requests]
    engine = Engine(model, rows=3, draft=draft)  # fewer rows than requests: the last waits
    got: dict[int, list[int]] = {}
    owner: dict[int, int] = {}
    waiting = list(range(len(requests)))
    step = 0
    while waiting or engine.rows:
        for r in list(waiting):
            if requests[r][0] <= step and engine.free:
                wanted = GREEDY.model_copy(update={"max_new_tokens": requests[r][2]})
                row = engine.add([requests[r][1]], wanted)[0]
                owner[id(row)], got[r] = r, []
                waiting.remove(r)
        if engine.rows:
            for row, token in zip(list(engine.rows), engine.pick()):
                r = owner[id(row)]
                got[r].append(token)
                if len(got[r]) == requests[r][2]:
                    engine.remove(row)
            if engine.rows:
                engine.advance()
        step += 1
    assert [got[r] for r in range(len(requests))] == expected
    assert engine.accepted == engine.proposed and (engine.proposed > 40) == speculative


def test_rows_of_one_request_sample_together_like_generate():
    """A group of rows (one request with n > 1) draws from one generator, as `gpt generate
    --num-samples` does, so the same seed gives the same tokens whether other requests share
    the batch or not."""
    model = randomize_(GPT(tiny_config()), seed=6).eval()
    config = SampleConfig(max_new_tokens=20, temperature=1.0, top_k=20)

    def run(with_other: bool) -> list[list[int]]:
        engine = Engine(model, rows=3)
        if with_other:
            engine.add([[4, 5, 6, 7]], SampleConfig(temperature=0))
        rows = engine.add([[1, 2, 3]] * 2, config, torch.Generator().manual_seed(9))
        for _ in range(19):
            engine.pick()
            engine.advance()
        engine.pick()
        return [r.tokens[3:] for r in rows]

    assert run(False) == run(True)


def test_the_first_prefill_does_not_wait_for_running_rows():
    """A request joins at the next step: its first logits are ready right after add()."""
    model = randomize_(GPT(tiny_config()), seed=7).eval()
    engine = Engine(model, rows=2)
    engine.add([[1, 2, 3]], GREEDY)
    engine.pick()
    engine.advance()
    (row,) = engine.add([[9, 8]], GREEDY)
    assert row.logits is not None and len(engine.pick()) == 2


@pytest.mark.parametrize("layout", ["plain", "inference"])
@pytest.mark.parametrize("options", [dict(), dict(position="rope")])
def test_the_compiled_decode_step_has_no_graph_breaks(options, layout):
    """What `--compile` compiles off the CPU, in the shapes the Engine calls it with (one token
    at one position, rows at different positions, a speculative verification of several
    tokens), on the static cache: one graph, no breaks (a break on a GPU would cost CUDA graphs). Checked
    here because no GPU has run this code yet; tests/test_gpu.py checks it there."""
    from gptcli.kv_cache import KVCache
    from gptcli.quantize import prepare

    model = randomize_(GPT(tiny_config(**options))).eval()
    if layout == "inference":  # how `gpt generate` loads models
        prepare(model, None)
    cache = KVCache.for_model(model.config, 2, static=True)
    for idx, start in ((torch.tensor([[1], [2]]), torch.tensor(3)),
                       (torch.tensor([[1], [2]]), torch.tensor([3, 5])),
                       (torch.tensor([[1, 2, 3], [2, 3, 4]]), torch.tensor(3))):
        torch._dynamo.reset()
        with torch.no_grad():
            explained = torch._dynamo.explain(model)(idx, kv_cache=cache, start_pos=start)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), \
            explained.break_reasons


def test_rows_added_together_pick_their_tokens_in_one_call(monkeypatch):
    """`gpt generate --num-samples 3` samples its rows as one group: one next_token call per
    step for the three (it was one per row), while a request added later is its own group."""
    import gptcli.decode as decode

    real, calls = decode.next_token, []

    def counted(logits, *args, **kwargs):
        calls.append(logits.size(0))
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(decode, "next_token", counted)
    model = randomize_(GPT(tiny_config()), seed=7).eval()
    engine = Engine(model, rows=4)
    engine.add([[1, 2], [3, 4], [5, 6]], GREEDY)
    engine.pick()
    assert calls == [3]
    engine.advance()
    engine.add([[7]], GREEDY)
    engine.pick()
    assert calls == [3, 3, 1]
