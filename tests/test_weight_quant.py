"""Weight-only int8: the per-channel quantization against its bound, Int8Linear against a float64
reference, the checkpoint round trip through scripts.quantize and generate.py, tensor-parallel
sharding, and the default model's quality."""
import pydoc_data.topics
import pytest
import torch

import tp
import weight_quant as wq
from generate import decode_one_token, generate, load_model
from scripts import quantize as quantize_script
from strategies import cache_factory
from tests.helpers import VOCAB, run, tiny_model
from tokenizer import get_tokenizer


def test_per_channel_round_trip_within_half_a_step():
    """|w - code * scale| <= scale / 2 plus the fp32 rounding of the division and the product
    (u = 2**-24 of |w| each): the codes are round(w / scale) with scale * 127 >= |w|."""
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.rand(64, 1) * 3
    w[5] = 0  # an all-zero row: scale 1, codes 0
    codes, scale = wq.quantize_int8_per_channel(w)
    assert codes.dtype == torch.int8 and scale.shape == (64,) and scale[5] == 1 and not codes[5].any()
    err = (codes.double() * scale.double()[:, None] - w.double()).abs()
    bound = scale.double()[:, None] / 2 + 2 * 2.0**-24 * w.double().abs()
    assert bool((err <= bound).all())


@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_matches_float64(bias):
    """Tolerance: the fp32 product of exact integer codes, then one multiply per output: ~1e-6."""
    torch.manual_seed(1)
    linear = torch.nn.Linear(48, 40, bias=bias)
    model = torch.nn.Module()
    model.lin = linear
    codes, scale = wq.quantize_int8_per_channel(linear.weight.data)
    q = wq.Int8Linear(48, 40, bias)
    q.weight.data, q.scales.data = codes, scale
    if bias:
        q.bias.data = linear.bias.data
    x = torch.randn(3, 7, 48)
    want = x.double() @ (codes.double() * scale.double()[:, None]).T + (linear.bias.double() if bias else 0)
    got = q(x)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-6


def test_quantized_tiny_model_tracks_the_float_one():
    """int8 weights move a tiny random model's logits by about the quantization's relative step
    (1/127 of each row's largest weight), far less than the logits' spread."""
    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (2, 40))
    want = run(model, tokens, {"strategy": "full"}, [40])
    got = run(wq.use_int8_linears(tiny_model(), quantize=True), tokens, {"strategy": "full"}, [40])
    assert ((got - want).norm() / want.norm()).item() < 0.02


def test_shards_split_scales_with_rows():
    """Column-parallel layers split codes and scales by output row, row-parallel ones split codes by
    input column and keep every scale; the ranks' partial outputs add up to the whole layer's."""
    x = torch.randn(2, 5, 64)
    whole = wq.use_int8_linears(tiny_model(), quantize=True)
    want = whole.layers[0].feed_forward.w2(whole.layers[0].feed_forward.w1(x))
    parts = []
    for r in range(2):
        m = wq.use_int8_linears(tiny_model(), quantize=True)
        ffn = m.layers[0].feed_forward
        tp._column_parallel(ffn.w1, [m.config.intermediate_size], 2, r, "cpu")
        tp._row_parallel(ffn.w2, 2, r, "cpu")
        assert ffn.w1.scales.shape == (m.config.intermediate_size // 2,) and ffn.w2.scales.shape == (m.config.dim,)
        parts.append(ffn.w2(ffn.w1(x)))
    torch.testing.assert_close(parts[0] + parts[1], want, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def int8_checkpoint(default_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("q") / default_checkpoint.parent.name
    folder.mkdir()
    for f in default_checkpoint.parent.glob("*.gguf"):
        (folder / f.name).symlink_to(f)
    quantize_script.main(["--checkpoint_path", str(default_checkpoint), "--out", str(folder / "model_int8.pth")])
    return folder / "model_int8.pth"


@pytest.mark.slow
def test_quantized_checkpoint_says_what_it_holds(int8_checkpoint, default_checkpoint):
    state = torch.load(int8_checkpoint, mmap=True, weights_only=True)
    assert state[wq.FORMAT_KEY] == "int8" and state["layers.0.feed_forward.w1.weight"].dtype == torch.int8
    assert state["tok_embeddings.weight"].dtype == torch.float32 and "layers.0.attention_norm.weight" in state
    assert int8_checkpoint.stat().st_size < default_checkpoint.stat().st_size / 2


@pytest.mark.slow
def test_quantized_default_model_quality(int8_checkpoint):
    """Within 0.5% of the full-precision perplexity (11.8832) on the README's protocol, and the
    greedy answer to "The capital of France is" stays " Paris."."""
    from tests.test_default_model import perplexity

    model = load_model(int8_checkpoint, "cpu", torch.float32)
    assert isinstance(model.layers[0].attention.wqkv, wq.Int8Linear)
    text = "\n\n".join(pydoc_data.topics.topics.values())
    tokenizer = get_tokenizer(int8_checkpoint.parent)
    ids = tokenizer.encode(text[:20000])[:2048]
    ppl = perplexity(model, ids, {"strategy": "full"})
    assert abs(ppl / 11.8832 - 1) < 0.005, ppl
    prompt = torch.tensor([tokenizer.encode("The capital of France is")])
    model.setup_caches(1, prompt.shape[1] + 4, cache_factory({"strategy": "full"}))
    with torch.no_grad():
        out = generate(model, prompt, 3, decode_one_token)["tokens"][0, prompt.shape[1]:]
    assert tokenizer.decode(out.tolist()).startswith(" Paris.")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["already quantized", "exists", "missing"])
def test_bad_input(int8_checkpoint, default_checkpoint, tmp_path, case, capsys):
    before = int8_checkpoint.stat().st_mtime_ns
    args = {"already quantized": ["--checkpoint_path", str(int8_checkpoint), "--out", str(tmp_path / "q.pth")],
            "exists": ["--checkpoint_path", str(default_checkpoint), "--out", str(int8_checkpoint)],
            "missing": ["--checkpoint_path", str(tmp_path / "nope.pth")]}[case]
    with pytest.raises(SystemExit) as e:
        quantize_script.main(args)
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value)
    assert int8_checkpoint.stat().st_mtime_ns == before and not (tmp_path / "q.pth").exists()


def test_unknown_mode_is_refused(capsys):
    with pytest.raises(SystemExit):
        quantize_script.main(["--checkpoint_path", "x.pth", "--mode", "int3"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err


def test_quantized_name_round_trips(tmp_path):
    """generate.py's hint for a missing quantized file must name the source scripts.quantize reads."""
    source = tmp_path / "my_model.pth"
    assert wq.quantized_path(source, "int8") == tmp_path / "my_model_int8.pth"
    assert wq.quantized_source(wq.quantized_path(source, "int8")) == (source, "int8")
    assert wq.quantized_source(source) is None  # "_model" is no weight format
    assert wq.quantized_source(tmp_path / "model.pth") is None
