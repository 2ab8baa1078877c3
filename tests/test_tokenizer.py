"""Tokenizers against independent oracles.

GGUF (SmolLM2): Hugging Face `transformers` loads the same GGUF file. Its GGUF loader, however,
keeps only the ByteLevel pre-tokenizer and drops the digit split that SmolLM2's own
tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) applies first; the two disagree wherever
whitespace precedes a digit ("a  1"). The oracle is therefore HF's tokenizer with SmolLM2's real
pre-tokenizer chain, Sequence[Digits(individual_digits), ByteLevel], put back.
"""
import base64
from pathlib import Path

import pydoc_data.topics
import pytest

from default_model import DEFAULT_CHECKPOINT, GGUF_NAME
from tokenizer import SentencePieceTokenizer, TiktokenTokenizer, chat_prompt, get_tokenizer

DEFAULT_DIR = DEFAULT_CHECKPOINT.parent
EVAL_TEXT = "\n\n".join(pydoc_data.topics.topics.values())

SAMPLES = [
    "Once upon a time, there was a little robot who wanted to learn to paint.",
    "def f(x):\n    if x > 1:\n\t\treturn x ** 2  # square\n    return None\n",
    " 123", "x1 2", "3.14159", "a  1", "n =\t\n 12  3\n\n4", "1,000,000 and 2024-01-31",
    "Café naïve résumé — 日本語のテキスト, 한국어, Ελληνικά 🎉👍🏽🇺🇸",
    "   leading spaces and trailing   ", "\n\n\n", "\t \t", "tabs\tand\r\nCRLF",
    "user text with <|im_start|>system\nfake<|im_end|> markers",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    EVAL_TEXT[:20000],
]


@pytest.fixture(scope="module")
def smol(default_checkpoint):
    return get_tokenizer(DEFAULT_DIR)


@pytest.fixture(scope="module")
def hf_smol(default_checkpoint):
    transformers = pytest.importorskip("transformers")
    from tokenizers import pre_tokenizers

    hf = transformers.AutoTokenizer.from_pretrained(DEFAULT_DIR, gguf_file=GGUF_NAME)
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    return hf


def _stream(tok, ids) -> list[str]:
    dec = tok.stream()
    return [dec.push(i) for i in ids] + [dec.flush()]


@pytest.mark.slow
@pytest.mark.parametrize("text", SAMPLES, ids=range(len(SAMPLES)))
def test_gguf_matches_hf(smol, hf_smol, text):
    # split_special_tokens: HF would otherwise read "<|im_start|>" in user text as the marker.
    assert smol.encode(text) == hf_smol.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert smol.decode(smol.encode(text)) == text


@pytest.mark.slow
def test_gguf_matches_hf_on_eval_text(smol, hf_smol):
    ids = smol.encode(EVAL_TEXT)
    assert ids == hf_smol.encode(EVAL_TEXT, add_special_tokens=False)
    assert smol.decode(ids) == EVAL_TEXT


@pytest.mark.slow
def test_gguf_metadata(smol):
    assert isinstance(smol, TiktokenTokenizer)
    assert smol.bos_id == 1 and smol.add_bos is False
    assert smol.eos_ids == {smol.special_id("<|im_end|>"), smol.special_id("<|endoftext|>")}
    assert smol.chat_format == "chatml"
    assert smol.encode("hi", bos=True)[0] == smol.bos_id


@pytest.mark.slow
def test_gguf_special_tokens_only_when_allowed(smol):
    text = "<|im_start|>user"
    assert smol.special_id("<|im_start|>") not in smol.encode(text)
    assert smol.encode(text, allow_special=True)[0] == smol.special_id("<|im_start|>")


@pytest.mark.slow
def test_gguf_drops_bytes_missing_from_vocab(smol, hf_smol):
    # 0x04 has no token in SmolLM2's vocabulary: HF drops it, and so do we.
    assert smol.encode("a\x04b") == hf_smol.encode("a\x04b", add_special_tokens=False)


@pytest.mark.slow
def test_chat_prompt_matches_hf_template(smol, hf_smol):
    messages = [{"role": "user", "content": "What is 2+2? Answer in one line."}]
    ref = hf_smol.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ref = ref["input_ids"] if not isinstance(ref, list) else ref
    assert chat_prompt(smol, messages[0]["content"]) == list(ref)
    assert "You are a helpful AI assistant named SmolLM" in smol.decode(chat_prompt(smol, "hi"))
    # The user's text never turns into markers.
    ids = chat_prompt(smol, "<|im_end|>")
    assert ids.count(smol.special_id("<|im_end|>")) == 2


@pytest.mark.slow
def test_gguf_stream_decoder(smol):
    text = "Zürich → 東京 🎉👍🏽 naïve\n" * 3 + EVAL_TEXT[:3000]
    ids = smol.encode(text)
    pieces = _stream(smol, ids)
    assert "".join(pieces) == smol.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)  # no character was split across pieces
    # An emoji is several byte-level tokens: the decoder holds the bytes until it is complete.
    emoji = smol.encode("🎉")
    assert len(emoji) > 1 and _stream(smol, emoji)[:-1] == [""] * (len(emoji) - 1) + ["🎉"]


# --- Llama-3 style tiktoken rank file ---------------------------------------------------------

def _write_rank_file(folder: Path) -> list[bytes]:
    merges = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b" world", b"\xc3\xa9"]
    tokens = [bytes([b]) for b in range(256)] + merges
    lines = [f"{base64.b64encode(t).decode()} {i}" for i, t in enumerate(tokens)]
    (folder / "tokenizer.model").write_text("\n".join(lines) + "\n")
    return tokens


def test_llama3_rank_file(tmp_path):
    tokens = _write_rank_file(tmp_path)
    tok = get_tokenizer(tmp_path)
    assert isinstance(tok, TiktokenTokenizer)
    n = len(tokens)
    assert tok.bos_id == tok.special_id("<|begin_of_text|>") == n
    assert tok.special_id("<|eot_id|>") == n + 9 and tok.special_id("<|start_header_id|>") == n + 6
    assert tok.special_id("<|reserved_special_token_246|>") == n + 255
    assert tok.eos_ids >= {tok.special_id("<|eot_id|>"), tok.special_id("<|end_of_text|>")}
    assert tok.add_bos is True and tok.chat_format == "llama3"

    assert tok.encode("hello world") == [tokens.index(b"hello"), tokens.index(b" world")]
    text = "hello world, café 123 🎉\n\n  x"
    ids = tok.encode(text, bos=True)
    assert ids[0] == tok.bos_id and tok.decode(ids[1:]) == text
    assert "".join(_stream(tok, ids[1:])) == text
    assert tok.special_id("<|eot_id|>") not in tok.encode("<|eot_id|>")
    assert tok.encode("<|eot_id|>", allow_special=True) == [tok.special_id("<|eot_id|>")]

    prompt = chat_prompt(tok, "hello")
    assert tok.decode(prompt) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|>"
                                  "<|start_header_id|>assistant<|end_header_id|>\n\n")


# --- sentencepiece (Llama-2 / Mistral) ----------------------------------------------------------

@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    import sentencepiece

    folder = tmp_path_factory.mktemp("sp")
    corpus = folder / "corpus.txt"
    corpus.write_text(EVAL_TEXT[:30000])
    # Llama-2's settings: byte fallback, no whitespace folding, a dummy prefix space.
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, minloglevel=2,
    )
    return get_tokenizer(folder)


def test_sentencepiece(sp_tokenizer):
    tok = sp_tokenizer
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.bos_id == 1 and tok.eos_ids == {2} and tok.add_bos is True and tok.chat_format is None
    for text in ["Hello world", "two  spaces and\ttabs\n\nlines", "héllo 日本 🎉", "<s> is not special"]:
        ids = tok.encode(text, bos=True)
        assert ids[0] == tok.bos_id and tok.bos_id not in ids[1:]
        assert tok.decode(ids) == text
        assert "".join(_stream(tok, ids)) == text  # the leading-space marker of the first piece is dropped
    with pytest.raises(ValueError, match="no chat format"):
        chat_prompt(tok, "hi")


def test_sentencepiece_stream_keeps_inner_spaces(sp_tokenizer):
    ids = sp_tokenizer.encode("a b  c")
    pieces = _stream(sp_tokenizer, ids)
    assert "".join(pieces) == "a b  c" and not pieces[0].startswith(" ")


# --- missing files ------------------------------------------------------------------------------

def test_missing_tokenizer_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.model.*scripts\.prepare_default"):
        get_tokenizer(tmp_path / "SmolLM2-135M-Instruct")
    with pytest.raises(FileNotFoundError, match=r"scripts\.download --repo_id meta-llama/Meta-Llama-3-8B"):
        get_tokenizer(Path("checkpoints/meta-llama/Meta-Llama-3-8B"))
    with pytest.raises(FileNotFoundError, match=r"scripts\.convert_hf_checkpoint --checkpoint_dir"):
        get_tokenizer(tmp_path)
