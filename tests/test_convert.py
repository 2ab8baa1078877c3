"""HF checkpoint -> model.pth: our Transformer must reproduce Hugging Face's logits.

Both run in fp32 on the CPU. They differ only in the order of floating-point operations (SDPA vs
eager attention, RoPE angles in fp64 vs fp32), which moves logits by ~1e-7 relative; a wrong Q/K
permutation, a swapped w1/w3 or a misnamed norm moves them by O(1). Weights are drawn large
enough that attention is far from uniform, so RoPE's layout matters to the output.
"""
import subprocess
import sys

import pytest
import torch

from default_model import DEFAULT_CHECKPOINT
from model import ModelArgs, Transformer
from scripts import download as download_script
from atomic_write import write_atomically
from scripts.convert_hf_checkpoint import ConversionError, convert
from strategies import cache_factory

transformers = pytest.importorskip("transformers")

SHAPES = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2, vocab_size=256,
              rms_norm_eps=1e-5, tie_word_embeddings=False)


def _hf_model(kind: str, n_kv_heads: int):
    if kind == "llama":
        config = transformers.LlamaConfig(num_key_value_heads=n_kv_heads, **SHAPES)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(num_key_value_heads=n_kv_heads, **SHAPES)
        model = transformers.Qwen2ForCausalLM(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 2.0 / p.shape[1] ** 0.5)  # large q/k: peaked attention
            else:
                p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.3)
    return model.eval()


def _our_logits(path, args: ModelArgs, idx: torch.Tensor) -> torch.Tensor:
    model = Transformer(args)
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    model.setup_caches(1, idx.shape[1], cache_factory({"strategy": "full"}))
    with torch.no_grad():
        return model(idx, torch.arange(idx.shape[1]))


def _check_matches_hf(hf_model, path, args):
    idx = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_model(idx).logits
    ours = _our_logits(path, args, idx)
    rel = (ours - ref).norm() / ref.norm()
    assert rel < 1e-5, f"relative error {rel:.2e}"


@pytest.mark.parametrize("storage", ["safetensors", "sharded", "bin"])
def test_llama_matches_hf(tmp_path, storage):
    hf = _hf_model("llama", n_kv_heads=2)
    if storage == "bin":  # transformers 5 only writes safetensors: write the legacy format by hand
        hf.config.save_pretrained(tmp_path)
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    else:
        hf.save_pretrained(tmp_path, **({"max_shard_size": "60KB"} if storage == "sharded" else {}))
    if storage == "sharded":
        assert (tmp_path / "model.safetensors.index.json").exists()
    path = convert(tmp_path, model_name="tiny")
    _check_matches_hf(hf, path, ModelArgs.from_name("tiny"))


def test_qwen2_bias_matches_hf(tmp_path):
    hf = _hf_model("qwen2", n_kv_heads=4)
    hf.save_pretrained(tmp_path)
    _check_matches_hf(hf, convert(tmp_path, model_name="tiny-mha"), ModelArgs.from_name("tiny-mha"))


def test_qwen2_gqa_bias_matches_hf(tmp_path):
    # No preset has GQA + bias at this size: explicit args (the k bias is permuted over 2 heads).
    args = ModelArgs(block_size=512, n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=128,
                     vocab_size=256, qkv_bias=True)
    hf = _hf_model("qwen2", n_kv_heads=2)
    hf.save_pretrained(tmp_path)
    _check_matches_hf(hf, convert(tmp_path, args=args), args)


def test_tied_embeddings_drop_output(tmp_path):
    config = transformers.LlamaConfig(num_key_value_heads=2, **dict(SHAPES, tie_word_embeddings=True))
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    args = ModelArgs(**dict(vars(ModelArgs.from_name("tiny")), tie_embeddings=True))
    sd = torch.load(convert(tmp_path, args=args), weights_only=True)
    assert "output.weight" not in sd and "tok_embeddings.weight" in sd


def test_copies_llama3_original_tokenizer(tmp_path):
    _hf_model("llama", n_kv_heads=2).save_pretrained(tmp_path)
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "tokenizer.model").write_text("IQ== 0\n")
    convert(tmp_path, model_name="tiny")
    assert (tmp_path / "tokenizer.model").read_text() == "IQ== 0\n"


def test_user_errors(tmp_path):
    with pytest.raises(ConversionError, match="does not exist"):
        convert(tmp_path / "nope")
    with pytest.raises(ConversionError, match="no config.json"):
        convert(tmp_path)
    _hf_model("llama", n_kv_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ConversionError, match="unknown model"):
        convert(tmp_path, model_name="no-such-model")
    with pytest.raises(ConversionError, match=r"num_key_value_heads=2 \(preset: 4\).*q/k/v bias=False \(preset: True\)"):
        convert(tmp_path, model_name="tiny-mha")


def _run(*argv):
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True)


def test_script_errors_are_one_line(tmp_path):
    _hf_model("llama", n_kv_heads=2).save_pretrained(tmp_path)
    for args in (["--checkpoint_dir", str(tmp_path / "nope")],
                 ["--checkpoint_dir", str(tmp_path), "--model_name", "llama-3-8b"]):
        result = _run("scripts.convert_hf_checkpoint", *args)
        assert result.returncode == 1
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    result = _run("scripts.convert_hf_checkpoint", "--checkpoint_dir", str(tmp_path), "--model_name", "tiny")
    assert result.returncode == 0 and (tmp_path / "model.pth").exists()


def test_download_arguments(monkeypatch):
    args = download_script.parse_args(["--repo_id", "meta-llama/Meta-Llama-3.1-8B", "--hf_token", "abc"])
    assert (args.repo_id, args.hf_token, args.model_name) == ("meta-llama/Meta-Llama-3.1-8B", "abc", None)
    with pytest.raises(SystemExit):
        download_script.parse_args([])  # --repo_id is required
    with pytest.raises(download_script.DownloadError, match="<org>/<name>"):
        download_script.download("not-a-repo-id")
    result = _run("scripts.download", "--repo_id", "bad id")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1


# -- writing, old formats, bugs (damaged downloads: tests/test_scripts_bad_input.py) ----------------
def test_a_legacy_pickle_bin_still_converts(tmp_path):
    hf = _hf_model("llama", n_kv_heads=2)
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    _check_matches_hf(hf, convert(tmp_path, model_name="tiny"), ModelArgs.from_name("tiny"))


def test_writing_model_pth_leaves_other_files_alone(tmp_path):
    _hf_model("llama", n_kv_heads=2).save_pretrained(tmp_path)
    (tmp_path / "model.partial").write_text("the user's")  # a name a careless writer would pick
    convert(tmp_path, model_name="tiny")
    assert (tmp_path / "model.partial").read_text() == "the user's"
    assert [p.name for p in tmp_path.glob("*partial*")] == ["model.partial"]  # no temporary file left behind


def test_write_atomically_cleans_up_after_a_failed_write(tmp_path):
    def fail(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomically(tmp_path / "model.pth", fail)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("loader", ["torch.load", "safetensors.safe_open"])
def test_a_bug_while_reading_is_a_traceback_not_advice(tmp_path, monkeypatch, loader):
    """Only what a damaged file raises becomes 'damaged'; a TypeError is ours and propagates."""
    _hf_model("llama", n_kv_heads=2).save_pretrained(tmp_path)
    if loader == "torch.load":
        (tmp_path / "model.safetensors").unlink()
        torch.save({}, tmp_path / "pytorch_model.bin")

    def broken(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr(loader, broken)
    with pytest.raises(TypeError, match="a bug"):
        convert(tmp_path, model_name="tiny")


def test_download_turns_network_and_disk_errors_into_one_line(tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HTTPError

    for error in (HTTPError("[Errno -3] Temporary failure in name resolution"), OSError(28, "No space left on device")):
        def fail(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(HfApi, "list_repo_files", fail)
        with pytest.raises(download_script.DownloadError, match="check the network and the free disk space"):
            download_script.download("org/name", root=tmp_path)


def test_download_lets_a_programming_error_through(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    def broken(*args, **kwargs):
        raise TypeError("list_repo_files() got an unexpected keyword argument")

    monkeypatch.setattr(HfApi, "list_repo_files", broken)
    with pytest.raises(TypeError):
        download_script.main(["--repo_id", "org/name"])
    assert download_script.CHECKPOINTS == DEFAULT_CHECKPOINT.parents[1]  # next to the code, not the current folder
