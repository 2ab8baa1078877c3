"""Tokenizers, picked by what a checkpoint folder holds.

    *.gguf                         byte-level BPE (SmolLM2) rebuilt as a tiktoken Encoding from the
                                   GGUF metadata: merge rank = token id, GPT-2 byte alphabet
    tokenizer.model (rank file)    Llama-3's tiktoken BPE ("<base64 token> <rank>" per line)
    tokenizer.model (protobuf)     sentencepiece (Llama-2, Mistral)

Every tokenizer has the same surface: encode / decode / token_bytes, bos_id, eos_ids, add_bos,
chat_format, stream(). User text never turns into special tokens; only chat templates
(allow_special=True) do.
"""
import base64
import codecs
import functools
import re
import struct
from pathlib import Path
from typing import Iterable, Optional

DEFAULT_MODEL_DIR_NAME = "SmolLM2-135M-Instruct"


class CheckpointFileError(Exception):
    """A file of a checkpoint folder that cannot be used (damaged, truncated, or of a kind we do
    not read); the message says which file and how to re-create it."""

# GPT-2's byte-level pre-tokenizer regex.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM2 ("smollm"): Hugging Face first isolates every digit (a separate pre-tokenizer), then runs
# GPT-2's regex on the pieces between digits. A piece ends right before a digit, so whitespace
# there is "followed by the end": `\s+(?!\S)` takes all of it, where a single GPT-2 regex would
# leave the last space to join the digit. `\s+(?=\p{N})` restores that in one regex.
SMOLLM_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
GGUF_PRE_PATTERNS = {"smollm": SMOLLM_PATTERN, "gpt2": GPT2_PATTERN, "llama-bpe": LLAMA3_PATTERN}

LLAMA3_SPECIAL = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]
LLAMA3_NUM_SPECIAL = 256
# Special tokens that end a turn or a document, in any vocabulary that has them.
END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")


class Tokenizer:
    """What the engine needs from a tokenizer; subclasses fill in the vocabulary."""

    bos_id: Optional[int] = None
    eos_ids: set[int]
    add_bos: bool = False  # whether the model expects a BOS at the start of a prompt
    chat_format: Optional[str] = None  # "chatml", "llama3" or None
    system_prompt: Optional[str] = None  # the chat template's default system message, if any
    strips_leading_space = False  # sentencepiece drops the space of the first piece on decode

    def encode(self, text: str, bos: bool = False, allow_special: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token contributes to the decoded text."""
        raise NotImplementedError

    def special_id(self, text: str) -> int:
        raise NotImplementedError

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Token ids in, one at a time; text out that is safe to print.

    Bytes go through an incremental UTF-8 decoder, so a character split across tokens is held
    back until it is complete: O(1) per token, and the pieces join to exactly `decode(ids)`.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._token_bytes = tokenizer.token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip_space = tokenizer.strips_leading_space

    def push(self, token_id: int) -> str:
        text = self._utf8.decode(self._token_bytes(token_id))
        return self._maybe_strip(text)

    def flush(self) -> str:
        """What is left at the end (an incomplete character becomes U+FFFD, as in decode)."""
        return self._maybe_strip(self._utf8.decode(b"", final=True))

    def _maybe_strip(self, text: str) -> str:
        if self._strip_space and text:
            self._strip_space = False
            return text[1:] if text.startswith(" ") else text
        return text


class TiktokenTokenizer(Tokenizer):
    """Byte-level BPE through tiktoken: SmolLM2 from GGUF metadata, Llama-3 from its rank file."""

    def __init__(self, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int], pattern: str,
                 vocab_size: int, name: str) -> None:
        import tiktoken

        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens)
        # Ids >= vocab_size are placeholders for bytes the vocabulary lacks (tiktoken needs every
        # byte); Hugging Face drops such bytes, and so does encode().
        self.vocab_size = vocab_size
        self.special_tokens = special_tokens
        self.eos_ids = {special_tokens[t] for t in END_TOKENS if t in special_tokens}
        if "<|im_start|>" in special_tokens:
            self.chat_format = "chatml"
        elif "<|start_header_id|>" in special_tokens:
            self.chat_format = "llama3"

    def encode(self, text: str, bos: bool = False, allow_special: bool = False) -> list[int]:
        ids = self.enc.encode(text, allowed_special="all" if allow_special else set(), disallowed_special=())
        if self.enc.max_token_value >= self.vocab_size:
            ids = [i for i in ids if i < self.vocab_size]
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        return self.enc.decode_single_token_bytes(token_id)

    def special_id(self, text: str) -> int:
        return self.special_tokens[text]


class SentencePieceTokenizer(Tokenizer):
    strips_leading_space = True
    add_bos = True

    def __init__(self, model_path: Path) -> None:
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_ids = {self.sp.eos_id()} if self.sp.eos_id() >= 0 else set()
        n = self.sp.get_piece_size()
        # Bytes per id, computed once: byte-fallback pieces "<0x0A>" are one byte, control pieces
        # (<s>, </s>) nothing, "▁" is the space marker.
        self._bytes = []
        for i in range(n):
            if self.sp.is_byte(i):
                self._bytes.append(bytes([int(self.sp.id_to_piece(i)[1:-1], 16)]))
            elif self.sp.is_control(i):
                self._bytes.append(b"")
            elif self.sp.is_unknown(i):
                self._bytes.append(" \u2047 ".encode())
            else:
                self._bytes.append(self.sp.id_to_piece(i).replace("\u2581", " ").encode())

    def encode(self, text: str, bos: bool = False, allow_special: bool = False) -> list[int]:
        # sentencepiece never reads control tokens out of text, so user text is always plain.
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def special_id(self, text: str) -> int:
        i = self.sp.piece_to_id(text)
        if i == self.sp.unk_id() and text != self.sp.id_to_piece(i):
            raise KeyError(text)
        return i


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = printable + [256 + n for n in range(len(others))]
    return {chr(c): b for b, c in zip(printable + others, chars)}


def _gguf_value(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def open_gguf(path: Path):
    """A GGUFReader over `path`; CheckpointFileError if the file is truncated or not GGUF."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    # What the reader raises on a short or foreign file: numpy's views and reshapes of the
    # memory map fail (ValueError, IndexError), or struct unpacking runs past the end.
    except (ValueError, IndexError, struct.error, OSError) as e:
        raise CheckpointFileError(f"{path} is damaged or not a GGUF file ({type(e).__name__}: {str(e)[:100]}); "
                                  f"delete it and run `{make_command(path.parent)}`")


@functools.lru_cache(maxsize=4)
def load_gguf_tokenizer(path: Path) -> TiktokenTokenizer:
    """Byte-level BPE from a GGUF file's `tokenizer.*` metadata (reading it takes ~2 s)."""
    reader = open_gguf(path)
    kind = _gguf_value(reader, "tokenizer.ggml.model")
    pre = _gguf_value(reader, "tokenizer.ggml.pre", "gpt2")
    if kind != "gpt2":
        raise CheckpointFileError(f"{path}: tokenizer model '{kind}' is not supported (only byte-level BPE, 'gpt2')")
    if pre not in GGUF_PRE_PATTERNS:
        raise CheckpointFileError(f"{path}: pre-tokenizer '{pre}' is not supported (known: {', '.join(GGUF_PRE_PATTERNS)})")
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    field = reader.fields["tokenizer.ggml.token_type"]
    types = [int(field.parts[i][0]) for i in field.data]

    byte_of = _gpt2_byte_decoder()
    ranks: dict[bytes, int] = {}
    special: dict[str, int] = {}
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        if kind == 3:  # control token
            special[tok] = i
        else:
            ranks[bytes(byte_of[c] for c in tok)] = i
    # Merges are in token-id order, so "merge rank = token id" is tiktoken's priority order.
    missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
    for n, b in enumerate(missing):
        ranks[b] = len(tokens) + n

    tok = TiktokenTokenizer(ranks, special, GGUF_PRE_PATTERNS[pre], vocab_size=len(tokens), name=path.stem)
    tok.bos_id = _gguf_value(reader, "tokenizer.ggml.bos_token_id")
    eos = _gguf_value(reader, "tokenizer.ggml.eos_token_id")
    if eos is not None:
        tok.eos_ids.add(int(eos))
    tok.add_bos = bool(_gguf_value(reader, "tokenizer.ggml.add_bos_token", False))
    template = _gguf_value(reader, "tokenizer.chat_template") or ""
    system = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template)
    tok.system_prompt = system.group(1) if system else None
    return tok


def load_llama3_tokenizer(path: Path) -> TiktokenTokenizer:
    ranks = {}
    for line in path.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    names = LLAMA3_SPECIAL + [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + LLAMA3_NUM_SPECIAL - len(LLAMA3_SPECIAL))]
    special = {name: len(ranks) + i for i, name in enumerate(names)}
    tok = TiktokenTokenizer(ranks, special, LLAMA3_PATTERN, vocab_size=len(ranks) + len(special), name="llama3")
    tok.bos_id = special["<|begin_of_text|>"]
    tok.add_bos = True
    return tok


def _is_tiktoken_file(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(256)
    return re.match(rb"[A-Za-z0-9+/=]+ \d+\r?\n", head) is not None


def make_command(checkpoint_dir: Path) -> str:
    """The command that makes (or re-makes) a checkpoint folder."""
    if checkpoint_dir.name == DEFAULT_MODEL_DIR_NAME:
        return "python -m scripts.prepare_default"
    parts = checkpoint_dir.parts
    if len(parts) >= 2 and "checkpoints" in parts[:-1]:
        repo_id = "/".join(parts[parts.index("checkpoints") + 1:])
        return f"python -m scripts.download --repo_id {repo_id}"
    return f"python -m scripts.convert_hf_checkpoint --checkpoint_dir {checkpoint_dir}"


def get_tokenizer(checkpoint_dir: Path) -> Tokenizer:
    """The tokenizer of a checkpoint folder: a *.gguf file, else tokenizer.model."""
    checkpoint_dir = Path(checkpoint_dir)
    ggufs = sorted(checkpoint_dir.glob("*.gguf")) if checkpoint_dir.is_dir() else []
    if ggufs:
        return load_gguf_tokenizer(ggufs[0])
    model = checkpoint_dir / "tokenizer.model"
    if model.is_file():
        return load_llama3_tokenizer(model) if _is_tiktoken_file(model) else SentencePieceTokenizer(model)
    raise FileNotFoundError(
        f"no tokenizer in {checkpoint_dir} (expected a *.gguf file or tokenizer.model); run `{make_command(checkpoint_dir)}`"
    )


def chat_prompt(tokenizer: Tokenizer, user_text: str) -> list[int]:
    """One user turn in the model's chat format, ending where the assistant's reply begins.

    Markers are looked up as special tokens and the text between them is encoded as plain text,
    the way Hugging Face splits a rendered template; the user's text never becomes a marker.
    """
    enc, special = tokenizer.encode, tokenizer.special_id
    if tokenizer.chat_format == "chatml":
        start, end = special("<|im_start|>"), special("<|im_end|>")
        ids = []
        if tokenizer.system_prompt is not None:
            ids += [start, *enc(f"system\n{tokenizer.system_prompt}"), end, *enc("\n")]
        return ids + [start, *enc(f"user\n{user_text}"), end, *enc("\n"), start, *enc("assistant\n")]
    if tokenizer.chat_format == "llama3":
        head, head_end, eot = special("<|start_header_id|>"), special("<|end_header_id|>"), special("<|eot_id|>")
        return [special("<|begin_of_text|>"), head, *enc("user"), head_end, *enc(f"\n\n{user_text}"), eot,
                head, *enc("assistant"), head_end, *enc("\n\n")]
    raise ValueError("this model's tokenizer has no chat format; give a plain prompt instead of a chat")
