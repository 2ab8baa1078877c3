"""Tensor parallelism (Megatron-style) for model.Transformer, on torch.distributed.

    torchrun --standalone --nproc_per_node 2 generate.py --prompt "..."        # one node
    srun ... torchrun --rdzv_backend c10d --rdzv_endpoint $MASTER_ADDR:29500 ... # scripts/slurm/tp_*.sbatch

Each rank holds 1/W of every layer:
  attention.wqkv   column-parallel: the q, k and v parts are split separately by heads, so rank r
                   holds query heads [r Hq/W, (r+1) Hq/W) and KV heads [r Hkv/W, (r+1) Hkv/W); with
                   GQA query head h reads KV head h // (Hq/Hkv), which is on the same rank.
                   Qwen's qkv bias is split with its rows.
  attention.wo     row-parallel (its input columns split by the same query heads)
  feed_forward.w1/w3 column-parallel, feed_forward.w2 row-parallel (intermediate_size / W each)
  int8 weights (weight_quant.Int8Linear) split alike; their per-output-row scales go with the rows
and one all-reduce (sum) after attention and one after the MLP, as functional collectives so that
torch.compile(fullgraph=True) traces them into the decode graph. The model's config and every
Attention get the per-rank head counts, so setup_caches() gives each rank caches of only its own KV
heads: the full cache, compress_kv and quantize_kv (body, scales, sink, window) are all per KV head.
cache.nbytes() is per rank; sum_over_ranks() gives the total.

Choices:
  - Head counts (query and KV) and intermediate_size must divide by the world size; otherwise the
    run stops with an error naming the sizes that work. We do not replicate KV heads (as vLLM does
    when W > Hkv): replication multiplies the cache, which is the memory TP is meant to divide.
  - tok_embeddings, the output layer and the norms are replicated (every rank holds them whole): no
    vocab-parallel gather, tied embeddings stay tied. Cost: each rank reads the whole output matrix
    every step (1 GiB of the 8 GiB per rank of Llama-3.1-8B at TP=2 in bf16).
  - Sampling runs on every rank on identical logits (all-reduce results are bitwise the same on
    every rank; the output layer is replicated) with the same seed, so every rank draws the same
    token without a broadcast.

Launching: init() reads what torchrun (or srun with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR set)
puts in the environment and joins the group (NCCL on cuda:LOCAL_RANK, gloo on the CPU) with a
timeout, so a dead or stuck rank makes the others fail instead of hanging. Without WORLD_SIZE > 1
nothing here runs and the model is untouched.
"""
import os
from datetime import timedelta
from typing import Optional

import torch

# Imported before any process group exists, on purpose: dynamo imported after the group holds
# references to it that destroy_process_group cannot drop (torch 2.13), and it is otherwise
# imported lazily (meta-device init, torch.compile). The group's gloo threads then outlive
# shutdown() and can abort the process at interpreter exit ("terminate called without an active
# exception") while freeing a collective's tensors. (An import inside init() would also make
# `torch` a local name there.)
import torch._dynamo  # noqa: F401
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn


# -- the process group ----------------------------------------------------------------------
def launched() -> bool:
    """Started by torchrun/srun with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0, or a single-process run: the one that prints."""
    return int(os.environ.get("RANK", "0")) == 0 if not dist.is_initialized() else rank() == 0


def init(device: str, timeout_s: float = 600) -> str:
    """Join the process group the launcher describes; returns this rank's device.

    No-op (returns `device`) for a single-process run. Raises ValueError for a launch that cannot
    work (more ranks on this node than GPUs).
    """
    if not launched():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        n_gpus = torch.cuda.device_count()
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        if max(local_world, local_rank + 1) > n_gpus:
            raise ValueError(f"{local_world} ranks on this node but {n_gpus} GPU(s) visible; "
                             f"use --nproc_per_node {n_gpus} or fewer (or --device cpu)")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_collective_failure(e: BaseException) -> bool:
    """A collective that failed because another rank died, hung past the timeout or cut its
    connection. NCCL raises DistError subclasses; gloo's transport raises a plain RuntimeError
    whose message names its source file (".../gloo/transport/tcp/pair.cc:537] Read error ...",
    "... unbound_buffer.cc:78] Timed out waiting ..."). Any other RuntimeError is a bug."""
    if isinstance(e, dist.DistError):
        return True
    return isinstance(e, RuntimeError) and world_size() > 1 and "gloo/transport/" in str(e)


def sum_over_ranks(n: int, device: str) -> int:
    """An integer summed over the ranks (a host sync: call it outside the decode step)."""
    if world_size() == 1:
        return n
    t = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t.item())


# -- sharding -------------------------------------------------------------------------------
def valid_world_sizes(config) -> list[int]:
    sizes = (config.n_head, config.n_local_heads, config.intermediate_size)
    return [w for w in range(1, config.n_local_heads + 1) if all(s % w == 0 for s in sizes)]


def check_world_size(config, world: int) -> None:
    """ValueError naming the world sizes that work when `world` does not divide the heads."""
    if world not in valid_world_sizes(config):
        raise ValueError(f"tensor parallelism over {world} ranks needs the query heads ({config.n_head}), KV heads "
                         f"({config.n_local_heads}) and intermediate size ({config.intermediate_size}) to divide by "
                         f"{world}; use --nproc_per_node in {valid_world_sizes(config)}")


def _rows(t: torch.Tensor, parts: list[int], world: int, r: int, device) -> torch.Tensor:
    """Rank r's share of each consecutive part (of the given sizes) of dim 0, concatenated.
    Only the slices are read (from a memory-mapped checkpoint) and moved to `device`."""
    out, start = [], 0
    for size in parts:
        share = size // world
        out.append(t.narrow(0, start + r * share, share).to(device))
        start += size
    return torch.cat(out) if len(out) > 1 else out[0].contiguous()


def _set_weight(linear: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    linear.out_features, linear.in_features = weight.shape


def _column_parallel(linear: nn.Module, parts: list[int], world: int, r: int, device) -> None:
    bias = None if linear.bias is None else _rows(linear.bias, parts, world, r, device)
    if hasattr(linear, "scales"):  # weight_quant.Int8Linear: one scale per output row, split with the rows
        linear.scales = nn.Parameter(_rows(linear.scales, parts, world, r, device), requires_grad=False)
    _set_weight(linear, _rows(linear.weight, parts, world, r, device), bias)


def _row_parallel(linear: nn.Module, world: int, r: int, device) -> None:
    assert linear.bias is None, "a row-parallel bias would be added once per rank"
    share = linear.in_features // world
    _set_weight(linear, linear.weight.narrow(1, r * share, share).to(device).contiguous())


def _all_reduce_output(module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
    # By name, not the ProcessGroup: torch.compile would trace the group as an opaque object and
    # keep it alive past shutdown() (the race that tp.init describes).
    return funcol.all_reduce(output, "sum", module.tp_group_name)


def shard(model: nn.Module, device=None, world: Optional[int] = None, r: Optional[int] = None) -> nn.Module:
    """Keep rank r's share of every layer of `model` (in place) and add the two all-reduces.

    The weights may be memory-mapped CPU tensors (generate.load_model) or live on a device
    (the benchmark's random model); each rank's slices are copied to `device` (default: where the
    weight is). Call before setup_caches(). Raises ValueError if the world size does not fit.
    """
    world = world_size() if world is None else world
    r = rank() if r is None else r
    c = model.config
    check_world_size(c, world)
    if world == 1:
        return model
    hd = c.head_dim
    q_size, kv_size = c.n_head * hd, c.n_local_heads * hd
    for layer in model.layers:
        attn, ffn = layer.attention, layer.feed_forward
        dev = attn.wqkv.weight.device if device is None else device
        _column_parallel(attn.wqkv, [q_size, kv_size, kv_size], world, r, dev)
        _row_parallel(attn.wo, world, r, dev)
        _column_parallel(ffn.w1, [c.intermediate_size], world, r, dev)
        _column_parallel(ffn.w3, [c.intermediate_size], world, r, dev)
        _row_parallel(ffn.w2, world, r, dev)
        attn.n_head //= world
        attn.n_local_heads //= world
        for module in (attn, ffn):
            module.tp_group_name = dist.group.WORLD.group_name
            module.register_forward_hook(_all_reduce_output)
    # Per-rank counts: setup_caches() sizes each rank's caches by c.n_local_heads. head_dim is
    # kept as it was (ModelArgs.__post_init__ would recompute it from the sharded n_head).
    c.n_head //= world
    c.n_local_heads //= world
    c.intermediate_size //= world
    model.tp_world_size = world
    return model
