"""The decode engine: rows that join and leave at different times decode exactly as alone."""

import pytest
import torch

from gptcli.config import SampleConfig
from gptcli.decode import Engine, decode_loop
from gptcli.model import GPT

from conftest import randomize_, tiny_config

GREEDY = SampleConfig(max_new_tokens=1, temperature=0)


def alone(model, prompt: list[int], n: int) -> list[int]:
    config = GREEDY.model_copy(update={"max_new_tokens": n})
    return [t.item() for t in decode_loop(model, torch.tensor([prompt]), config)]


@pytest.mark.parametrize("options", [dict(), dict(position="rope"), dict(position="sinusoidal")])
def test_rows_joining_and_leaving_decode_as_they_would_alone(options):
    """Requests arrive at different steps (so they sit at different positions), finish at
    different steps (so rows move in the cache), and outgrow the context of 32 (so their
    windows slide at different times): each row's greedy tokens equal its solo run."""
    torch.manual_seed(0)
    model = randomize_(GPT(tiny_config(**options)), seed=5).eval()
    g = torch.Generator().manual_seed(1)
    requests = [  # (arrives at step, prompt, tokens wanted)
        (0, torch.randint(0, 101, (5,), generator=g).tolist(), 50),
        (3, torch.randint(0, 101, (9,), generator=g).tolist(), 12),
        (7, torch.randint(0, 101, (2,), generator=g).tolist(), 45),
        (9, torch.randint(0, 101, (30,), generator=g).tolist(), 20),
    ]
    expected = [alone(model, prompt, n) for _, prompt, n in requests]
    engine = Engine(model, rows=3)  # fewer rows than requests: the last one waits for a slot
    got: dict[int, list[int]] = {}
    owner: dict[int, int] = {}
    waiting = list(range(len(requests)))
    step = 0
    while waiting or engine.rows:
        for r in list(waiting):
            if requests[r][0] <= step and engine.free:
                row = engine.add([requests[r][1]], GREEDY)[0]
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
