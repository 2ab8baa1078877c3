"""The evaluation metrics on cases with known answers, and one --quick run of the sweep."""
import json
import math
from pathlib import Path

import pytest
import torch

import evaluation as ev
from kv_cache import full_cache_nbytes
from model import ModelArgs, Transformer
from strategies import cache_factory

TOL = 1e-4  # as tests/test_caches.py: fp32 summation-order noise only


# -- ROUGE-L --------------------------------------------------------------------------------------
def test_rouge_identical_and_disjoint():
    assert ev.rouge_l_f1("The cat sat on the mat.", "the cat SAT on the mat") == 1.0
    assert ev.rouge_l_f1("alpha beta gamma", "delta epsilon") == 0.0
    assert ev.rouge_l_f1("", "anything") == 0.0


def test_rouge_partial_by_hand():
    # candidate: a b c d e (5 words), reference: a x c e (4 words); LCS = a c e = 3.
    # P = 3/5, R = 3/4, F1 = 2PR/(P+R) = 2 * 0.45 / 1.35 = 2/3.
    assert ev.rouge_l_f1("a b c d e", "a x c e") == pytest.approx(2 / 3)
    assert ev.lcs_length("ABCBDAB", "BDCABA") == 4  # the textbook example
    assert ev.words("Don't-stop, 3.14!") == ["don", "t", "stop", "3", "14"]


# -- perplexity of known distributions --------------------------------------------------------------
class FixedLogits(torch.nn.Module):
    """Same next-token distribution at every position, whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, idx, input_pos):
        return self.logits.expand(idx.shape[0], idx.shape[1], -1).clone()


def test_uniform_model_has_perplexity_vocab_size():
    vocab = 37
    tokens = torch.randint(0, vocab, (100,))
    for chunk in (1, 7, 200):
        nll, _ = ev.streaming_nll(FixedLogits(torch.zeros(vocab)), tokens, chunk)
        assert nll.shape == (99,)
        assert ev.perplexity(nll) == pytest.approx(vocab, rel=1e-6)


def test_categorical_model_perplexity():
    p = torch.tensor([0.5, 0.25, 0.125, 0.125])
    tokens = torch.tensor([3, 0, 0, 1, 2, 0, 1])  # predicted: 0 0 1 2 0 1
    nll, top1 = ev.streaming_nll(FixedLogits(p.log()), tokens, chunk=4)
    expected = math.exp(-(3 * math.log(0.5) + 2 * math.log(0.25) + math.log(0.125)) / 6)
    assert ev.perplexity(nll) == pytest.approx(expected, rel=1e-6)
    assert top1.tolist() == [0] * 6
    assert ev.top1_agreement(top1.tolist(), [0, 0, 1, 2, 0, 1]) == pytest.approx(3 / 6)


def test_segment_perplexities():
    nll = torch.tensor([math.log(2)] * 4 + [math.log(8)] * 3, dtype=torch.float64)
    segs = ev.segment_perplexities(nll, 4)
    assert [(s["start"], s["end"]) for s in segs] == [(0, 4), (4, 7)]
    assert [s["ppl"] for s in segs] == pytest.approx([2.0, 8.0])


# -- chunked perplexity == token by token on the tiny random model ---------------------------------
SETTINGS = [
    {"strategy": "full"},
    {"strategy": "compress_kv", "sink_size": 4, "window_size": 8, "rope": "streaming"},
    {"strategy": "compress_kv", "sink_size": 4, "window_size": 8, "rope": "original"},
    {"strategy": "quantize_kv", "sink_size": 4, "window_size": 8, "bits": 8},
    {"strategy": "quantize_kv", "sink_size": 4, "window_size": 8, "bits": 4, "key_group": 16, "value_group": 16},
    {"strategy": "quantize_kv", "sink_size": 4, "window_size": 8, "bits": 2, "key_group": 16, "value_group": 16},
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
def test_chunked_perplexity_equals_token_by_token(settings):
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny")).eval()
    tokens = torch.randint(0, 256, (90,))
    results = {}
    for chunk in (1, 16, 64):
        model.setup_caches(1, len(tokens), cache_factory(settings))
        results[chunk] = ev.streaming_nll(model, tokens, chunk)
    ref_nll, ref_top1 = results[1]
    for chunk in (16, 64):
        nll, top1 = results[chunk]
        torch.testing.assert_close(nll, ref_nll, atol=TOL, rtol=0)
        assert ev.perplexity(nll) == pytest.approx(ev.perplexity(ref_nll), rel=1e-5)
        assert top1.tolist() == ref_top1.tolist()


# -- needle ---------------------------------------------------------------------------------------
def fake_encode(text: str) -> list[int]:
    """One id per character (ord), enough to check positions and decode back."""
    return [ord(c) for c in text]


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_needle_prompt_places_the_needle_at_depth(depth):
    filler = [ord("x")] * 1000
    number = ev.needle_number(seed=3, digits=7)
    assert 10**6 <= number < 10**7
    ids, at = ev.needle_prompt(fake_encode, filler, 400, depth, number)
    assert len(ids) == 400
    text = "".join(map(chr, ids))
    needle = f"\n{ev.MAGIC} {number}.\n"
    n_fill = 400 - len(needle) - len(f"\n{ev.MAGIC}")
    assert text.index(needle) == at == round(depth * n_fill)
    assert text.endswith(f"\n{ev.MAGIC}")
    assert ev.needle_found(f" {number}.", number)
    assert not ev.needle_found(f" {number}9.", number) and not ev.needle_found(" 12.", number)
    with pytest.raises(ValueError):
        ev.needle_prompt(fake_encode, filler[:10], 400, depth, number)


def test_cache_nbytes_matches_the_caches():
    config = ModelArgs.from_name("tiny")
    assert ev.cache_nbytes(config, {"strategy": "full"}, 300) == full_cache_nbytes(1, 300, config.n_local_heads, config.head_dim, config.n_layer)
    torch.manual_seed(0)
    model = Transformer(config).to(torch.bfloat16)
    for settings in SETTINGS[1:]:
        model.setup_caches(1, 300, cache_factory(settings))
        assert ev.cache_nbytes(config, settings, 300) == sum(c.nbytes() for c in model.caches())


# -- the results file ------------------------------------------------------------------------------
def test_saving_results_leaves_other_files_alone(tmp_path):
    """eval.tmp was the temporary name of eval.json and a user's eval.tmp was lost with it."""
    from scripts.evaluate import CellStore

    (tmp_path / "eval.tmp").write_text("the user's")
    store = CellStore(tmp_path / "eval.json", {"checkpoint": "x"}, None)
    store.get_or_run("cell", lambda: {"ppl": 1.5})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "eval.tmp"]
    assert (tmp_path / "eval.tmp").read_text() == "the user's"
    assert json.loads((tmp_path / "eval.json").read_text())["cells"] == {"cell": {"ppl": 1.5}}


def test_a_bug_is_a_traceback(tmp_path, monkeypatch):
    from scripts import evaluate

    def broken(name):
        raise TypeError("a bug")

    monkeypatch.setattr(evaluate, "pick_device", broken)
    with pytest.raises(TypeError, match="a bug"):
        evaluate.main(["--quick", "--out", str(tmp_path / "eval.json")])


# -- the sweep, end to end ------------------------------------------------------------------------
@pytest.mark.slow
def test_quick_sweep_writes_results_and_resumes(tmp_path, default_checkpoint):
    from scripts.evaluate import main

    out = tmp_path / "eval.json"
    first = main(["--quick", "--device", "cpu", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["runs"][-1]["cells_computed"] > 0 and data["runs"][-1]["cells_skipped"] == 0
    assert data["meta"]["git_commit"] and data["meta"]["torch"] == torch.__version__
    table = {r["label"]: r for r in data["figures"]["table"]}
    assert table["full"]["ppl_ratio"] == 1.0 and table["full"]["rouge_l_vs_full"] == 1.0
    for r in table.values():
        assert r["ppl"] > 1 and 0 <= r["top1_agreement"] <= 1 and r["needle_accuracy"] is not None
        assert 0 < r["kv_ratio_bf16"] <= 1
    assert table["quantize_kv int8 s16 w32"]["ppl_ratio"] == pytest.approx(1, abs=0.01)
    assert all(Path(p).exists() for p in data["plots"])
    assert (tmp_path / "eval_table.md").read_text().count("| Quantized int4") == 2

    cells = dict(data["cells"])
    second = main(["--quick", "--device", "cpu", "--out", str(out)])
    assert second["runs"][-1]["cells_computed"] == 0
    assert second["runs"][-1]["cells_skipped"] == first["runs"][-1]["cells_computed"]
    assert second["cells"] == cells
