import pytest
from pydantic import ValidationError

from gptcli.config import PRESETS, ModelConfig, SampleConfig, TrainConfig
from gptcli.errors import validation_message
from gptcli.model import GPT


def tensor_count(model) -> int:
    """Parameters the model really holds: each distinct tensor once (tied ones are one)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def test_gpt2_preset_parameter_count():
    config = ModelConfig.from_preset("gpt2")
    assert config.num_params() == 124_439_808
    assert tensor_count(GPT(config)) == 124_439_808


@pytest.mark.parametrize("name,expected", [
    ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_published_gpt2_sizes(name, expected):
    assert ModelConfig.from_preset(name).num_params() == expected


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_cpu_presets_count_matches_model(name):
    config = ModelConfig.from_preset(name, vocab_size=65)
    assert tensor_count(GPT(config)) == config.num_params()


def test_cpu_preset_shapes():
    tiny = ModelConfig.from_preset("tiny")
    assert (tiny.n_layer, tiny.n_head, tiny.n_embd, tiny.context_length) == (4, 4, 128, 64)
    small = ModelConfig.from_preset("small")
    assert (small.n_layer, small.n_head, small.n_embd, small.context_length) == (6, 6, 384, 256)


@pytest.mark.parametrize("options", [
    dict(norm="rmsnorm"), dict(position="sinusoidal"), dict(position="rope"), dict(bias=False),
    dict(tie_embeddings=False)])
def test_num_params_formula_matches_model_for_every_option(options):
    config = ModelConfig(vocab_size=77, context_length=16, n_layer=2, n_head=2, n_embd=32, **options)
    assert tensor_count(GPT(config)) == config.num_params()


def test_overrides_and_unknown_preset():
    assert ModelConfig.from_preset("tiny", context_length=128, n_layer=None).context_length == 128
    with pytest.raises(ValueError, match="unknown preset 'huge'; choose one of: tiny, small, gpt2"):
        ModelConfig.from_preset("huge")
    assert set(PRESETS) >= {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny", "small"}


def test_validation_explains_itself():
    with pytest.raises(ValidationError) as err:
        ModelConfig(n_embd=100, n_head=3)
    assert validation_message(err.value) == "n_embd (100) must be divisible by n_head (3)"
    with pytest.raises(ValidationError) as err:
        ModelConfig(norm="batchnorm")
    assert validation_message(err.value) == "norm must be 'layernorm' or 'rmsnorm', got 'batchnorm'"
    with pytest.raises(ValidationError) as err:
        ModelConfig(n_layers=3)
    assert validation_message(err.value) == "n_layers is not a setting"
    with pytest.raises(ValidationError, match="rope needs an even head size"):
        ModelConfig(n_embd=15, n_head=5, position="rope")


def test_true_or_false_where_a_number_belongs_is_refused():
    for config, field in ((ModelConfig, "n_layer"), (ModelConfig, "dropout"),
                          (TrainConfig, "max_steps"), (TrainConfig, "n_embd"),
                          (SampleConfig, "seed"), (SampleConfig, "temperature")):
        for value in (True, False):
            with pytest.raises(ValidationError) as err:
                config.model_validate({field: value})
            assert validation_message(err.value) == \
                f"{field} must be a number, not {str(value).lower()}"
    # a bool setting still takes its own values, a number field still takes numbers
    assert TrainConfig.model_validate({"compile": True, "max_steps": 3, "lr": 1}).max_steps == 3
    assert ModelConfig.model_validate({"bias": False}).bias is False


def test_json_round_trip():
    config = ModelConfig.from_preset("tiny", vocab_size=65, norm="rmsnorm", position="rope",
                                     bias=False, dropout=0.1, tie_embeddings=False)
    assert ModelConfig.model_validate_json(config.model_dump_json()) == config
