"""Evaluation metrics as plain functions: a model (caches already set up), token ids in, numbers out.

Streaming perplexity: the text flows through the cache as in generation, so token j+1 is predicted
from what the strategy holds once token j is in. One token per forward is the reference
semantics; feeding a chunk of T tokens (`model(chunk, input_pos)` gives the logits of every
position) computes the same thing, because every cache masks each query by what it held at that
query's moment (tests/test_caches.py, tests/test_evaluation.py check the two agree).

ROUGE-L is over words: lower-cased runs of [a-z0-9], the tokenizer of Google's `rouge_score`
(so it does not depend on the model's tokenizer and matches the seed's metric).

Needle in a haystack, RULER-style completion: "The special magic number is NNNNNNN." is hidden at
a depth of filler text; the prompt ends with "The special magic number is" and a needle counts as
found when the number appears (as a whole run of digits) in the greedy completion.
"""
import math
import random
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

MAGIC = "The special magic number is"


# -- corpus ---------------------------------------------------------------------------------------
def load_corpus(text_file: Optional[Path] = None) -> str:
    """Python's own documentation (docs/design.md: the evaluation text), or the given UTF-8 file."""
    if text_file is None:
        from pydoc_data.topics import topics

        return "\n\n".join(topics.values())
    return Path(text_file).read_text(encoding="utf-8")


# -- streaming perplexity ---------------------------------------------------------------------------
@torch.no_grad()
def streaming_nll(model, tokens: torch.Tensor, chunk: int, progress: Optional[Callable] = None):
    """tokens [T] through a batch-1 cache set up for >= T positions, `chunk` tokens per forward
    (1 = token by token). Returns (nll [T-1] float64, top1 [T-1]): nll[j] = -log p(tokens[j+1]),
    top1[j] the argmax, both from what the cache held once token j was in. The last token is
    never fed: it predicts nothing."""
    n = tokens.shape[0]
    assert n >= 2 and chunk >= 1
    nll = torch.empty(n - 1, dtype=torch.float64)
    top1 = torch.empty(n - 1, dtype=torch.long)
    for s in range(0, n - 1, chunk):
        e = min(s + chunk, n - 1)
        logits = model(tokens[None, s:e], torch.arange(s, e, device=tokens.device))[0]  # [T, V] fp32
        logp = torch.log_softmax(logits.float(), dim=-1)
        target = tokens[s + 1 : e + 1]
        nll[s:e] = -logp.gather(1, target[:, None])[:, 0].double().cpu()
        top1[s:e] = logits.argmax(dim=-1).cpu()
        if progress is not None:
            progress(e - s)
    return nll, top1


def perplexity(nll: torch.Tensor) -> float:
    return math.exp(nll.double().mean().item())


def segment_perplexities(nll: torch.Tensor, segment: int) -> list[dict]:
    """Perplexity of each run of `segment` predicted tokens: [{start, end, ppl}], where the tokens
    predicted are those at positions start+1 .. end (nll index start .. end-1)."""
    return [{"start": s, "end": min(s + segment, len(nll)), "ppl": perplexity(nll[s : s + segment])}
            for s in range(0, len(nll), segment)]


def top1_agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Fraction of positions where two next-token argmaxes (teacher forcing) agree."""
    assert len(a) == len(b) and len(a) > 0
    return sum(x == y for x, y in zip(a, b)) / len(a)


# -- ROUGE-L --------------------------------------------------------------------------------------
def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Longest common subsequence, O(len(a) * len(b)) time, O(len(b)) memory."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_f1(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over words; 0 when either side has no words."""
    c, r = words(candidate), words(reference)
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(c), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


# -- greedy continuation ----------------------------------------------------------------------------
@torch.no_grad()
def greedy_continuation(model, prompt_ids: Sequence[int], n_new: int, prefill_chunk: int, device) -> dict:
    """Temperature-0 generation through generate.generate (plain, uncompiled decode step), no stop
    tokens: exactly n_new new ids. The caches must hold len(prompt_ids) + n_new positions."""
    from generate import decode_one_token, generate

    prompt = torch.tensor([list(prompt_ids)], device=device)
    r = generate(model, prompt, n_new, decode_one_token, temperature=0.0, prefill_chunk=prefill_chunk)
    return {"ids": r["tokens"][0, prompt.shape[1]:].tolist(), "ttft_s": r["ttft_s"],
            "decode_s": r["decode_s"], "decode_tokens": r["decode_tokens"]}


# -- needle in a haystack ---------------------------------------------------------------------------
def needle_number(seed: int, digits: int = 7) -> int:
    return random.Random(seed).randint(10 ** (digits - 1), 10**digits - 1)


def needle_prompt(encode: Callable[[str], list[int]], filler_ids: Sequence[int], length: int, depth: float,
                  number: int) -> tuple[list[int], int]:
    """A prompt of exactly `length` token ids: filler, with the needle sentence inserted after a
    fraction `depth` of the filler tokens, then the question. Returns (ids, needle's first index)."""
    assert 0.0 <= depth <= 1.0
    needle = encode(f"\n{MAGIC} {number}.\n")
    question = encode(f"\n{MAGIC}")
    n_fill = length - len(needle) - len(question)
    if n_fill < 0 or n_fill > len(filler_ids):
        raise ValueError(f"a {length}-token needle prompt needs {max(n_fill, 0)} filler tokens; have {len(filler_ids)}")
    at = round(depth * n_fill)
    return list(filler_ids[:at]) + needle + list(filler_ids[at:n_fill]) + question, at


def needle_found(completion: str, number: int) -> bool:
    return str(number) in re.findall(r"\d+", completion)


# -- memory -----------------------------------------------------------------------------------------
def cache_nbytes(config, settings: dict, n_tokens: int, dtype=torch.bfloat16, batch_size: int = 1) -> int:
    """Bytes the caches of every layer hold when set up for n_tokens positions, from the caches'
    own nbytes(), built on the meta device (nothing allocated)."""
    from strategies import cache_factory

    freqs_cis = torch.empty(n_tokens, config.head_dim // 2, 2, device="meta")
    cache = cache_factory(settings)(
        batch_size=batch_size, max_seq_length=n_tokens, n_kv_heads=config.n_local_heads,
        head_dim=config.head_dim, dtype=dtype, device="meta", freqs_cis=freqs_cis,
    )
    return cache.nbytes() * config.n_layer  # every layer's cache is the same shape
