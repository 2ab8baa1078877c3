"""Convert a Hugging Face Llama / Mistral / Qwen2 checkpoint into our model.pth.

    python -m scripts.convert_hf_checkpoint --checkpoint_dir checkpoints/<org>/<name> [--model_name PRESET]

Reads model.safetensors (single or sharded via model.safetensors.index.json) or pytorch_model*.bin,
renames to model.py's parameters, fuses q/k/v into wqkv and writes `model.pth` next to them.
HF stores each head's Q/K rows in rotate-half order (first half of the head, then second half);
our RoPE rotates interleaved pairs (Meta's layout), so those rows are permuted back. The preset
(from the folder name unless --model_name) is checked against config.json first.
"""
import argparse
import json
import pickle
import shutil
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Iterator, Optional

import torch

from atomic_write import write_atomically

from model import ModelArgs


class ConversionError(Exception):
    """An error the user can fix (wrong folder, wrong preset, a damaged download); reported in one line."""


REDOWNLOAD = "download it again, e.g. with `python -m scripts.download --repo_id <org>/<name>`"


def reason(e: BaseException) -> str:
    """'Type: first sentence' of an exception, for a one-line message (torch's run over lines)."""
    text = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:150]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def damaged(path: Path, why: str) -> ConversionError:
    return ConversionError(f"{path} is damaged ({why}); {REDOWNLOAD}")


def read_json_object(path: Path) -> dict:
    """A downloaded JSON file that must hold an object; anything else is a broken download."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise damaged(path, f"not valid JSON: {reason(e)}") from None
    if not isinstance(data, dict):
        raise damaged(path, f"holds {json.dumps(data)[:40]}, not a JSON object")
    return data


# HF name inside a layer -> ours. q/k/v are handled apart: they are fused into wqkv.
_LAYER_NAMES = {
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "output.weight"}
_QKV = ("q_proj", "k_proj", "v_proj")


def _rope_theta(config: dict) -> Optional[float]:
    # transformers >= 5 nests it under rope_parameters.
    return config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta"))


def check_config(config: dict, args: ModelArgs, name: str) -> None:
    """Shapes must match the preset exactly; a differing rope base or norm eps is only a warning
    (the weights load, but outputs will be off until the preset is fixed)."""
    n_head = config.get("num_attention_heads")
    qkv_bias = config.get("model_type") == "qwen2" or bool(config.get("attention_bias", False))
    expected = {
        "hidden_size": (config.get("hidden_size"), args.dim),
        "num_hidden_layers": (config.get("num_hidden_layers"), args.n_layer),
        "num_attention_heads": (n_head, args.n_head),
        "num_key_value_heads": (config.get("num_key_value_heads", n_head), args.n_local_heads),
        "head_dim": (config.get("head_dim") or args.head_dim, args.head_dim),
        "intermediate_size": (config.get("intermediate_size"), args.intermediate_size),
        "vocab_size": (config.get("vocab_size"), args.vocab_size),
        "tie_word_embeddings": (bool(config.get("tie_word_embeddings", False)), args.tie_embeddings),
        "q/k/v bias": (qkv_bias, args.qkv_bias),
    }
    wrong = [f"{key}={got} (preset: {want})" for key, (got, want) in expected.items() if got != want]
    if wrong:
        raise ConversionError(f"config.json does not match preset '{name}': {', '.join(wrong)}; pick another --model_name")
    for key, got, want in (("rope_theta", _rope_theta(config), args.rope_base),
                           ("rms_norm_eps", config.get("rms_norm_eps"), args.norm_eps)):
        if got is not None and float(got) != float(want):
            print(f"warning: config.json {key}={got} but preset '{name}' uses {want}", file=sys.stderr)


def _index_files(index: Path) -> list[Path]:
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise damaged(index, "no weight_map from tensor names to file names")
    return [index.parent / f for f in sorted(set(weight_map.values()))]


def _weight_files(checkpoint_dir: Path) -> list[Path]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = checkpoint_dir / index_name
        if index.exists():
            return _index_files(index)
        if (checkpoint_dir / single).exists():
            return [checkpoint_dir / single]
    raise ConversionError(f"no model.safetensors or pytorch_model*.bin in {checkpoint_dir}")


def _safetensors_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except SafetensorError as e:  # a truncated or overwritten file fails its header checks
        raise damaged(path, reason(e)) from None


def _torch_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with warnings.catch_warnings():  # the unpickler warns about what it is about to reject
            warnings.simplefilter("ignore")
            # mmap needs the zip format; files saved by torch < 1.6 are plain pickles.
            shard = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except (RuntimeError, ValueError, OSError, EOFError, pickle.UnpicklingError) as e:
        # What torch.load raises for a damaged file depends on where the damage is.
        raise damaged(path, reason(e)) from None
    if not isinstance(shard, dict) or not all(isinstance(t, torch.Tensor) for t in shard.values()):
        raise damaged(path, "not a state dict of tensors")
    yield from shard.items()


def iter_tensors(checkpoint_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) one at a time, so only one source tensor is in memory beside the output."""
    for path in _weight_files(checkpoint_dir):
        if not path.exists():
            raise ConversionError(f"{path} is listed in the index but missing; {REDOWNLOAD}")
        yield from (_safetensors_tensors if path.suffix == ".safetensors" else _torch_tensors)(path)


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows -> interleaved pairs, per head: rows [h, 2, D/2] become [h, D/2, 2].
    Works for a weight [n_heads*D, dim] and a bias [n_heads*D] alike."""
    rest = w.shape[1:]
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(w.shape)


def convert_state_dict(tensors: Iterator[tuple[str, torch.Tensor]], args: ModelArgs) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    pending: dict[tuple[int, str], dict[str, torch.Tensor]] = {}  # (layer, "weight"|"bias") -> q/k/v
    for name, t in tensors:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name in _TOP_NAMES:
            if name == "lm_head.weight" and args.tie_embeddings:
                continue  # tied: output reuses tok_embeddings
            sd[_TOP_NAMES[name]] = t
            continue
        parts = name.split(".")  # model.layers.{i}.{rest}
        if parts[:2] != ["model", "layers"]:
            raise ConversionError(f"unexpected tensor '{name}'; is this a Llama/Mistral/Qwen2 checkpoint?")
        i, rest = int(parts[2]), ".".join(parts[3:])
        if rest in _LAYER_NAMES:
            sd[f"layers.{i}.{_LAYER_NAMES[rest]}"] = t
        elif parts[3] == "self_attn" and parts[4] in _QKV:
            group = pending.setdefault((i, parts[5]), {})
            group[parts[4]] = t
            if len(group) == 3:
                q = permute_rotary(group["q_proj"], args.n_head)
                k = permute_rotary(group["k_proj"], args.n_local_heads)
                sd[f"layers.{i}.attention.wqkv.{parts[5]}"] = torch.cat([q, k, group["v_proj"]])
                del pending[(i, parts[5])]
        else:
            raise ConversionError(f"unexpected tensor '{name}'; is this a Llama/Mistral/Qwen2 checkpoint?")
    if pending:
        raise ConversionError(f"incomplete q/k/v for layers {sorted({i for i, _ in pending})}; the download is incomplete")
    return sd


def convert(checkpoint_dir: Path, model_name: Optional[str] = None, args: Optional[ModelArgs] = None) -> Path:
    """Write checkpoint_dir/model.pth; returns its path. `args` overrides the preset lookup."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise ConversionError(f"{checkpoint_dir} does not exist; download it with `python -m scripts.download --repo_id <org>/<name>`")
    config_path = checkpoint_dir / "config.json"
    if not config_path.exists():
        raise ConversionError(f"no config.json in {checkpoint_dir}; is this a Hugging Face checkpoint folder?")
    config = read_json_object(config_path)
    name = model_name or checkpoint_dir.name
    if args is None:
        try:
            args = ModelArgs.from_name(name)
        except ValueError as e:
            raise ConversionError(f"{e}; pass --model_name") from None
    check_config(config, args, name)

    sd = convert_state_dict(iter_tensors(checkpoint_dir), args)
    expected = {f"layers.{i}.{n}" for i in range(args.n_layer) for n in _LAYER_NAMES.values()}
    expected |= {f"layers.{i}.attention.wqkv.weight" for i in range(args.n_layer)}
    expected |= {"tok_embeddings.weight", "norm.weight"} | (set() if args.tie_embeddings else {"output.weight"})
    if missing := sorted(expected - sd.keys()):
        raise ConversionError(f"checkpoint lacks {len(missing)} tensors (first: {missing[0]}); the download is incomplete")

    out = checkpoint_dir / "model.pth"
    try:
        write_atomically(out, lambda tmp: torch.save(sd, tmp))
    except OSError as e:  # a full disk, a read-only folder
        raise ConversionError(f"could not write {out} ({reason(e)}); free some space or make the folder writable") from None
    # Llama-3 repos keep Meta's tiktoken rank file under original/; the tokenizer looks next to model.pth.
    original_tokenizer = checkpoint_dir / "original" / "tokenizer.model"
    if original_tokenizer.exists() and not (checkpoint_dir / "tokenizer.model").exists():
        write_atomically(checkpoint_dir / "tokenizer.model", lambda tmp: shutil.copyfile(original_tokenizer, tmp))
    return out


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_dir", type=Path, required=True, help="folder with config.json and the weights")
    parser.add_argument("--model_name", default=None, help="preset name (default: the folder's name)")
    args = parser.parse_args(argv)
    try:
        out = convert(args.checkpoint_dir, args.model_name)
    except ConversionError as e:
        sys.exit(f"error: {e}")
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
