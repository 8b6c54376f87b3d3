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


# ----------------------------------------------------------------------------- kept positions

def run_out(engine: Engine, row, n: int) -> list[int]:
    """Decode ``row`` (alone in ``engine``) for ``n`` greedy tokens, then free it."""
    for i in range(n):
        engine.pick()
        if i + 1 < n:
            engine.advance()
    engine.remove(row)
    return row.tokens


@pytest.mark.parametrize("speculative", [False, True])
@pytest.mark.parametrize("options", [dict(), dict(position="rope")])
def test_a_prompt_that_continues_a_freed_row_is_fed_from_where_they_part(options, speculative):
    """A conversation's next turn: the prompt is the last sequence and more. Only the new part
    is fed (all but the last token of what was decoded stays in the cache), and the tokens are
    those of a fresh engine. (The draft is another model: some proposals are rejected, and
    their positions in the cache are not kept.)"""
    model = randomize_(GPT(tiny_config(**options)), seed=8).eval()
    draft = randomize_(GPT(tiny_config(n_layer=1, **options)), seed=15).eval()
    engine = Engine(model, rows=1, draft=Draft(draft, 3) if speculative else None)
    first = engine.add([[5, 6, 7]], GREEDY.model_copy(update={"max_new_tokens": 6}))[0]
    tokens = run_out(engine, first, 6)
    assert engine.cache.held[0] == tokens[:-1]
    follow = tokens + [11, 12]
    row = engine.add([follow], GREEDY.model_copy(update={"max_new_tokens": 8}))[0]
    assert row.cached == len(tokens) - 1
    fresh = Engine(model, rows=1).add([follow], GREEDY)[0]
    torch.testing.assert_close(row.logits, fresh.logits, rtol=1e-5, atol=1e-5)
    assert run_out(engine, row, 8)[len(follow):] == alone(model, follow, 8)
    if speculative:
        assert engine.accepted < engine.proposed  # (rejections)
    # the same prompt again: everything but its last token is kept
    again = engine.add([follow], GREEDY)[0]
    assert again.cached == len(follow) - 1
    torch.testing.assert_close(again.logits, fresh.logits, rtol=1e-5, atol=1e-5)


def test_a_free_row_lends_its_positions_to_the_row_a_prompt_goes_to():
    """Rows move when others leave, so the positions a prompt can use may sit in another free
    row: they are copied into the prompt's row, and a prompt that parts early keeps only the
    shared start."""
    model = randomize_(GPT(tiny_config()), seed=9).eval()
    engine = Engine(model, rows=3)
    a, b, c = engine.add([[1, 2, 3]], GREEDY)[0], engine.add([[4, 5]], GREEDY)[0], \
        engine.add([[6, 7, 8, 9]], GREEDY)[0]
    for _ in range(4):
        engine.pick()
        engine.advance()
    engine.pick()
    engine.remove(c)  # the last row: row 2 keeps c
    engine.remove(a)  # b moves into row 0, a into row 1, which keeps it
    assert engine.cache.held[1:] == [a.tokens[:-1], c.tokens[:-1]]
    follow = c.tokens[:6] + [13, 14]
    row = engine.add([follow], GREEDY)[0]  # into row 1, with row 2's first 6 positions
    assert engine.rows.index(row) == 1 and row.cached == 6
    fresh = Engine(model, rows=1).add([follow], GREEDY)[0]
    torch.testing.assert_close(row.logits, fresh.logits, rtol=1e-5, atol=1e-5)
    assert engine.cache.held == [[], [], c.tokens[:-1]]  # rows in use hold nothing to lend


def test_two_conversations_taking_turns_each_keep_their_positions():
    """Two conversations take turns on an engine of three rows (a server with two clients):
    each new prompt goes into row 0, and what row 0 held moves to a free row that holds
    nothing, so each conversation's next turn still finds its earlier turns."""
    model = randomize_(GPT(tiny_config()), seed=16).eval()
    engine = Engine(model, rows=3)
    talks = {"a": [1, 2, 3], "b": [40, 41, 42, 43]}
    for turn in range(3):
        for name in ("a", "b"):
            row = engine.add([talks[name]], GREEDY)[0]
            assert engine.rows.index(row) == 0
            assert row.cached == (len(talks[name]) - 3 if turn else 0)
            fresh = Engine(model, rows=1).add([talks[name]], GREEDY)[0]
            torch.testing.assert_close(row.logits, fresh.logits, rtol=1e-5, atol=1e-5)
            talks[name] = run_out(engine, row, 4) + [7, 8]
    assert sorted(map(len, engine.cache.held)) == [0, len(talks["a"]) - 3, len(talks["b"]) - 3]


def take_turn(engine: Engine, model: GPT, talks: dict, name: str) -> int:
    """One turn of conversation ``name`` on ``engine`` (decoded alone, as a fresh engine would,
    then freed, its next message added); returns how many prompt positions were kept."""
    row = engine.add([talks[name]], GREEDY)[0]
    fresh = Engine(model, rows=1).add([talks[name]], GREEDY)[0]
    torch.testing.assert_close(row.logits, fresh.logits, rtol=1e-5, atol=1e-5)
    talks[name] = run_out(engine, row, 4) + [7, 8]
    return row.cached


def test_two_conversations_on_two_rows_swap_places():
    """Two clients on a server of two rows: a turn's positions come from the free row, which
    takes what the first row held instead (a swap), so neither conversation is lost."""
    model = randomize_(GPT(tiny_config()), seed=19).eval()
    engine = Engine(model, rows=2)
    talks = {"a": [1, 2, 3], "b": [40, 41, 42, 43]}
    cached = [take_turn(engine, model, talks, name) for _ in range(3) for name in ("a", "b")]
    assert cached[:2] == [0, 0] and all(cached[2:])


def test_a_swap_that_fails_half_way_keeps_neither_row(monkeypatch):
    """The swap of a turn's row with what the first free row held stops after one layer's
    keys (a failure): neither row is known any more, and both conversations' next turns are
    fed whole, as on a fresh engine."""
    model = randomize_(GPT(tiny_config()), seed=22).eval()
    engine = Engine(model, rows=2)
    talks = {"a": [1, 2, 3], "b": [40, 41, 42, 43]}
    for name in ("a", "b"):
        take_turn(engine, model, talks, name)
    real = engine.cache.exchange

    def half(a, b, a_length, b_length):
        engine.cache.k[0][b, :, :a_length] = engine.cache.k[0][a, :, :a_length]
        raise RuntimeError("injected")

    monkeypatch.setattr(engine.cache, "exchange", half)
    with pytest.raises(RuntimeError, match="injected"):
        engine.add([talks["a"]], GREEDY)
    monkeypatch.setattr(engine.cache, "exchange", real)
    engine.remove(engine.rows[0])
    assert engine.cache.held == [[], []]
    assert [take_turn(engine, model, talks, name) for name in ("a", "b")] == [0, 0]


def test_a_new_conversation_pushes_out_the_one_left_longest_ago():
    """Four conversations on three rows: the fourth pushes out the one kept longest ago (not
    the one that ended last, which sits in the row the new prompt goes to), so the three most
    recent find their earlier turns and the oldest is fed whole."""
    model = randomize_(GPT(tiny_config()), seed=20).eval()
    engine = Engine(model, rows=3)
    talks = {"a": [1, 2, 3], "b": [40, 41, 42, 43], "c": [60, 61], "d": [80, 81, 82]}
    assert [take_turn(engine, model, talks, n) for n in "abcd"] == [0, 0, 0, 0]
    for name in "bcd":
        kept = len(talks[name]) - 3  # its last turn's but the last token
        assert take_turn(engine, model, talks, name) == kept
    assert take_turn(engine, model, talks, "a") == 0


def test_prompts_written_together_hand_over_the_newest_of_what_their_rows_held():
    """Two prompts of one length go into two free rows together with one row to spare: what the
    two rows held goes there newest first, so the conversation kept last survives."""
    model = randomize_(GPT(tiny_config()), seed=21).eval()
    engine = Engine(model, rows=5)
    engine.add([[99, 1, 1]], GREEDY)  # row 0, in use throughout
    b, a = engine.add_groups([([[98, 1, 1]], GREEDY, None, None),
                              ([[97, 1, 1]], GREEDY, None, None)])
    engine.remove(a[0])  # kept first
    engine.remove(b[0])  # kept last
    engine.add([[96, 1, 1]], GREEDY)  # row 1: rows 2 and 3 hold 97's and 98's, row 4 nothing
    engine.add_groups([([[95, 1, 1]], GREEDY, None, None), ([[94, 1, 1]], GREEDY, None, None)])
    assert engine.add([[98, 1, 1, 5]], GREEDY)[0].cached == 2


def test_a_request_that_ends_while_a_later_one_runs_keeps_its_positions():
    """Two clients' requests overlap: the first ends while the second still decodes (so the
    second's row moves into its place). The first's keys and values go to the freed row, its
    next turn reuses them, and the second's next turn reuses its own once it ends."""
    model = randomize_(GPT(tiny_config()), seed=17).eval()
    engine = Engine(model, rows=4)
    a = engine.add([[1, 2, 3]], GREEDY)[0]
    b = engine.add([[40, 41, 42, 43]], GREEDY)[0]
    for step in range(6):
        engine.pick()
        if step == 3:
            engine.remove(a)  # b moves into row 0
        engine.advance()
    engine.pick()
    engine.remove(b)
    for done in (a, b):
        follow = done.tokens + [7, 8]
        row = engine.add([follow], GREEDY)[0]
        assert row.cached == len(done.tokens) - 1
        fresh = Engine(model, rows=1).add([follow], GREEDY)[0]
        torch.testing.assert_close(row.logits, fresh.logits, rtol=1e-5, atol=1e-5)
        engine.remove(row)


def test_a_removal_that_fails_half_way_keeps_nothing_of_the_row_it_overwrote(monkeypatch):
    """The last row's move into the gap stops after one layer (a failure), and the removal is
    tried again (as gpt serve's clean-up does): the removed row's cache row was partly
    overwritten, so nothing of it is kept, and its next turn is fed whole."""
    model = randomize_(GPT(tiny_config()), seed=18).eval()
    engine = Engine(model, rows=3)
    a = engine.add([[1, 2, 3]], GREEDY)[0]
    engine.add([[40, 41, 42, 43]], GREEDY)
    for _ in range(4):
        engine.pick()
        engine.advance()
    engine.pick()
    real = engine.cache.move

    def half(source, target, length):
        engine.cache.k[0][target, :, :length] = engine.cache.k[0][source, :, :length]
        raise RuntimeError("injected")

    monkeypatch.setattr(engine.cache, "move", half)
    with pytest.raises(RuntimeError, match="injected"):
        engine.remove(a)
    monkeypatch.setattr(engine.cache, "move", real)
    engine.remove(a)
    follow = a.tokens + [7]
    row = engine.add([follow], GREEDY)[0]
    assert row.cached == 0
    torch.testing.assert_close(row.logits, Engine(model, rows=1).add([follow], GREEDY)[0].logits,
                               rtol=1e-5, atol=1e-5)


def test_a_slid_window_is_kept_as_the_window_it_is():
    """A sequence longer than the context keeps the window its row holds: a prompt whose window
    starts the same way reuses it, and one whose window starts elsewhere does not; both decode
    as on a fresh engine."""
    model = randomize_(GPT(tiny_config()), seed=10).eval()
    long = torch.randint(0, 101, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    # 40 tokens again (the last one another): the same window; 41: the window starts at 16
    for other, cached in ((lambda t: t[:-1] + [3], 31), (lambda t: t + [3], 0)):
        engine = Engine(model, rows=1)
        first = engine.add([long], GREEDY)[0]
        tokens = run_out(engine, first, 10)  # 40 tokens: the window starts at 8
        assert first.start == 8 and engine.cache.held[0] == tokens[8:-1]
        follow = other(tokens)
        row = engine.add([follow], GREEDY)[0]
        assert row.cached == cached
        assert run_out(engine, row, 5)[len(follow):] == alone(model, follow, 5)


def test_a_prefill_that_fails_keeps_nothing():
    """A prefill that fails (here: a token id the model has not got) leaves its rows unknown,
    and so do the rows of the same add that it never reached: freeing them keeps nothing, and
    the next prompt is fed whole."""
    model = randomize_(GPT(tiny_config()), seed=11).eval()
    engine = Engine(model, rows=2)
    tokens = run_out(engine, engine.add([[1, 2, 3]], GREEDY)[0], 4)
    with pytest.raises(IndexError):  # the 3-token prompt's prefill goes first, and fails
        engine.add_groups([([tokens[:2] + [500]], GREEDY, None, None),
                           ([tokens + [7]], GREEDY, None, None)])
    for row in list(engine.rows):
        engine.remove(row)
    assert engine.cache.held == [[], []]
    row = engine.add([tokens + [7]], GREEDY)[0]
    assert row.cached == 0
    torch.testing.assert_close(row.logits, Engine(model, rows=1).add([tokens + [7]], GREEDY)[0]
                               .logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("speculative", [False, True])
def test_a_window_refill_that_fails_half_way_keeps_nothing(speculative, monkeypatch):
    """A sequence outgrows the context and its window is fed again; the second layer fails
    (after the first wrote the new window over the old one). The row's cache is then neither
    the old window nor the new: freeing it keeps nothing, and the next prompt decodes as on a
    fresh engine."""
    model = randomize_(GPT(tiny_config()), seed=13).eval()
    draft = Draft(randomize_(GPT(tiny_config(n_layer=1)), seed=14).eval(), 3) \
        if speculative else None
    engine = Engine(model, rows=1, draft=draft)
    prompt = list(range(1, 21))
    row = engine.add([prompt], GREEDY.model_copy(update={"max_new_tokens": 30}))[0]
    block, armed = model.h[1], []
    real = block.forward

    def failing(x, *args, **kwargs):
        if armed and x.size(1) > 8:  # the refill (a round or a step feeds at most 4)
            raise RuntimeError("injected")
        return real(x, *args, **kwargs)

    monkeypatch.setattr(block, "forward", failing)
    armed.append(True)
    with pytest.raises(RuntimeError, match="injected"):
        for _ in range(30):
            engine.pick()
            engine.advance()
    assert len(row.sequence()) > 32 and row.start == -1
    armed.clear()
    engine.remove(row)
    assert engine.cache.held == [[]]
    follow = row.tokens[:-1]
    again = engine.add([follow], GREEDY)[0]
    torch.testing.assert_close(again.logits, Engine(model, rows=1).add([follow], GREEDY)[0]
                               .logits, rtol=1e-5, atol=1e-5)


def test_one_prompt_in_several_rows_is_fed_once():
    """--num-samples 3: the prompt goes through the model once (a batch of one) and its keys
    and values are copied to the other rows, which then decode as they would have alone."""
    model = randomize_(GPT(tiny_config()), seed=12).eval()
    shapes = []
    model.wte.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    engine = Engine(model, rows=4)
    engine.add([[1, 2, 3]], GREEDY)  # another request, already decoding
    engine.pick()
    engine.advance()
    shapes.clear()
    rows = engine.add([[4, 5, 6, 7]] * 3, SampleConfig(temperature=1.0),
                      torch.Generator().manual_seed(3))
    assert shapes == [(1, 4)]
    fresh = Engine(model, rows=1).add([[4, 5, 6, 7]], GREEDY)[0]
    for row in rows:
        torch.testing.assert_close(row.logits, fresh.logits, rtol=1e-5, atol=1e-5)
    for _ in range(5):
        engine.pick()
        engine.advance()
    engine.pick()
    # each row's cache holds its own sequence: a step from it equals a fresh prefill of it
    for row in rows:
        torch.testing.assert_close(row.logits, Engine(model, rows=1).add(
            [row.tokens[:-1]], GREEDY)[0].logits, rtol=1e-4, atol=1e-4)
