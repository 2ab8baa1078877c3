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
  output           vocab-parallel: rank r holds rows [r S, (r+1) S) of the vocabulary, S = ceil(V/W)
                   (VocabShard), and computes only their logits
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
  - The output layer is split by vocabulary rows, so each rank reads 1/W of it every step (it was
    1 GiB of the 8 GiB per rank of Llama-3.1-8B at TP=2 in bf16 when replicated). The vocabulary
    need not divide by W: the last rank holds fewer rows and pads its logits with -inf.
    Tied embeddings stay tied: the table stays whole on every rank for the lookup, and the
    output product reads a view of the rank's rows.
  - Sampling gathers only what it needs: at temperature 0 each rank's best (logit, id), W pairs;
    with top-k each rank's k largest logits (W k values: the k-th largest overall) and then each
    rank's winner of the exponential race (generate.sample; each rank keeps its slice of noise
    drawn for the whole vocabulary, alike on every rank from the same seed). Every rank gets the
    same gathered values, so every rank picks the same token. model(..., gather=True), the
    default, gathers the whole vocabulary's logits for the callers that need them (perplexity,
    tests).
  - The per-layer all-reduces go through NCCL (funcol.all_reduce), or with all_reduce="symm_mem"
    through one-shot all-reduces over symmetric memory (CUDA, NVLink) for the decode step's
    small messages; larger ones (prefill) still go through NCCL. NVLink multicast (NVLS, multimem)
    stays off either way (init()).

Launching: init() reads what torchrun (or srun with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR set)
puts in the environment and joins the group (NCCL on cuda:LOCAL_RANK, gloo on the CPU) with a
timeout, so a dead or stuck rank makes the others fail instead of hanging. Without WORLD_SIZE > 1
nothing here runs and the model is untouched.
"""
import gc
import math
import os
from dataclasses import dataclass
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
import torch.distributed._symmetric_memory as symm_mem
import torch.nn as nn
import torch.nn.functional as F

from argmax import argmax

ALL_REDUCES = ("nccl", "symm_mem")
# Set whatever the user's environment says (not setdefault): a program that uses NVLink multicast
# (NCCL's NVLS algorithms, symmetric memory's multimem) can take the host's GPUs out of service.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
# The dtypes torch's one-shot kernel takes (AT_DISPATCH_FLOAT_AND_BFLOAT16 in
# CUDASymmetricMemoryOps.cu); messages of other dtypes go through NCCL.
SYMM_MEM_DTYPES = (torch.bfloat16, torch.float32)


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
    os.environ.update(NO_MULTICAST)  # read when NCCL's communicators and symmetric memory are made
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
    _symm_mem_buffers.clear()  # freed while the group they were joined over still exists
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            release_cuda_graphs()
        dist.destroy_process_group()


def release_cuda_graphs() -> None:
    """Free the CUDA graphs torch.compile recorded (the decode step's). NCCL destroys a
    communicator only once every CUDA graph that captured one of its collectives is gone
    (pytorch/pytorch#115388), and inductor keeps its graphs for the process's life: without
    this, every compiled run under torchrun hung in destroy_process_group after its output."""
    torch._dynamo.reset()  # drops inductor's CUDA-graph trees with the compiled code
    gc.collect()


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
    if linear.scales is not None:  # weight_quant.Int8Linear: one scale per output row, split with the rows
        linear.scales = nn.Parameter(_rows(linear.scales, parts, world, r, device), requires_grad=False)
    _set_weight(linear, _rows(linear.weight, parts, world, r, device), bias)


def _row_parallel(linear: nn.Module, world: int, r: int, device) -> None:
    assert linear.bias is None, "a row-parallel bias would be added once per rank"
    share = linear.in_features // world
    _set_weight(linear, linear.weight.narrow(1, r * share, share).to(device).contiguous())


# -- the all-reduces -------------------------------------------------------------------------
def check_all_reduce(all_reduce: str, device) -> None:
    """ValueError for an all-reduce choice that cannot run on `device`."""
    if all_reduce == "symm_mem" and torch.device(device).type != "cuda":
        raise ValueError("--all_reduce symm_mem needs CUDA GPUs (it all-reduces through their symmetric memory); "
                         "use --all_reduce nccl")


# group name -> its staging buffer in symmetric memory (set_up_symm_mem), kept for the process's
# life (until shutdown()): the decode step's CUDA graph holds its address.
_symm_mem_buffers: dict[str, torch.Tensor] = {}


def set_up_symm_mem(nbytes: int, device, group_name: str) -> None:
    """Allocate the group's staging buffer and join it with every rank's (a collective)."""
    buffer = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
    symm_mem.rendezvous(buffer, group_name)
    _symm_mem_buffers[group_name] = buffer


# A custom op, opaque to torch.compile, so that the staging buffer never enters the traced graph:
# inductor lowers the symm_mem ops itself and first copies a graph input it did not allocate into
# symmetric memory of its own (torch 2.13's comm_lowering.py), one kernel more per all-reduce.
@torch.library.custom_op("tp::symm_mem_all_reduce", mutates_args=())
def symm_mem_all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """x summed over the ranks by a one-shot all-reduce: one kernel copies x into this rank's
    staging buffer, then each rank reads every rank's over NVLink and sums."""
    staging = _symm_mem_buffers[group_name].view(x.dtype)[: x.numel()].view(x.shape)
    return torch.ops.symm_mem.one_shot_all_reduce_copy(staging, x.contiguous(), "sum", group_name)


@symm_mem_all_reduce.register_fake
def _(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return torch.empty_like(x)


def all_reduce(x: torch.Tensor, group_name: str, symm_mem_bytes: int = 0) -> torch.Tensor:
    """x summed over the ranks: through symmetric memory if x fits in the group's staging buffer
    of symm_mem_bytes (0: none) and its dtype is one the kernel takes, NCCL otherwise. x's shape
    and dtype are static in a traced graph, so the branch is taken once per graph: the decode
    step's messages ([B, 1, dim]) fit, prefill's chunks do not."""
    if x.dtype in SYMM_MEM_DTYPES and x.numel() * x.element_size() <= symm_mem_bytes:
        return symm_mem_all_reduce(x, group_name)
    return funcol.all_reduce(x, "sum", group_name)


def _all_reduce_output(module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
    # By name, not the ProcessGroup: torch.compile would trace the group as an opaque object and
    # keep it alive past shutdown() (the race that tp.init describes).
    return all_reduce(output, module.tp_group_name, module.tp_symm_mem_bytes)


# -- the vocabulary -------------------------------------------------------------------------
@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of the vocabulary: rows [start, start + size) of the output layer. Every
    rank holds `share` = ceil(V / W) rows but the last, which holds what is left. Its logits are
    padded with -inf up to `share` (pad()): the gathers need one shape on every rank, and -inf
    never wins an argmax nor enters a top-k. (Padding the weight instead would copy the tied
    embedding table's rows.)"""

    vocab_size: int
    world: int
    rank: int
    group_name: str

    def __post_init__(self):
        assert (self.world - 1) * self.share < self.vocab_size, "every rank holds at least one row"
        assert self.vocab_size < 2**24, "argmax() carries token ids as fp32"

    @property
    def share(self) -> int:
        return -(-self.vocab_size // self.world)

    @property
    def start(self) -> int:
        return self.rank * self.share

    @property
    def size(self) -> int:
        return min(self.share, self.vocab_size - self.start)

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a [V, ...] weight: a view."""
        return weight.narrow(0, self.start, self.size)

    def pad(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., size] -> [..., share], the padding -inf."""
        return logits if self.size == self.share else F.pad(logits, (0, self.share - self.size), value=-math.inf)

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        """Every rank's [..., share] -> the whole vocabulary's [..., V]."""
        every = self._all_gather(logits.movedim(-1, 0))  # [W * share, ...]: rank order is vocabulary order
        return every[: self.vocab_size].movedim(0, -1)  # the padding is the last rank's tail

    def kth_largest(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        """Every rank's [B, share] -> the k-th largest logit of the whole vocabulary [B, 1]. Each
        rank's k largest hold all of the vocabulary's k largest."""
        top = logits.topk(min(k, self.share), dim=-1).values  # [B, k']
        every = self._all_gather(top).view(self.world, *top.shape)  # [W, B, k']
        every = every.transpose(0, 1).reshape(top.shape[0], -1)  # [B, W k']
        return every.topk(min(k, self.vocab_size), dim=-1).values[..., -1:]

    def argmax(self, scores: torch.Tensor) -> torch.Tensor:
        """Every rank's [B, share] -> the token id [B, 1] of the largest score of the whole
        vocabulary; among equal scores the lowest id, as torch.argmax over all of them picks."""
        local_id = argmax(scores)  # [B, 1]: the lowest of this rank's ties
        # Score and id in one gather: ids below 2^24 are exact in fp32.
        pair = torch.cat([scores.gather(-1, local_id).float(), (local_id + self.start).float()], dim=-1)  # [B, 2]
        every = self._all_gather(pair).view(self.world, -1, 2)  # [W, B, 2]
        winner = every[..., 0].argmax(dim=0, keepdim=True)  # [1, B]: the lowest rank of the ties
        return every[..., 1].gather(0, winner).long().view(-1, 1)

    def _all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x [n, ...] -> [W n, ...] in rank order. The functional op itself: its
        Python wrapper is all_gather_tensor in torch 2.11 and all_gather_single in 2.13 (where
        the old name warns)."""
        gathered = torch.ops._c10d_functional.all_gather_into_tensor(x.contiguous(), self.world, self.group_name)
        return funcol.wait_tensor(gathered)


def vocab_shard(model: nn.Module) -> Optional[VocabShard]:
    """The model's slice of the vocabulary under tensor parallelism; None for a whole model."""
    return getattr(model, "vocab_shard", None)


def _output_rows(linear: nn.Module, shard: VocabShard, device) -> None:
    assert linear.bias is None, "no output layer has a bias"

    def rows(t: torch.Tensor) -> torch.Tensor:
        return shard.rows(t).to(device).contiguous()

    if linear.scales is not None:  # weight_quant.Int8Linear: one scale per output row, split with the rows
        linear.scales = nn.Parameter(rows(linear.scales), requires_grad=False)
    _set_weight(linear, rows(linear.weight))


# -- sharding a model ----------------------------------------------------------------------
def shard(model: nn.Module, device=None, world: Optional[int] = None, r: Optional[int] = None,
          all_reduce: str = "nccl", max_batch_size: int = 1) -> nn.Module:
    """Keep rank r's share of every layer of `model` (in place) and add the two all-reduces.

    The weights may be memory-mapped CPU tensors (generate.load_model) or live on a device
    (the benchmark's random model); each rank's slices are copied to `device` (default: where the
    weight is). all_reduce="symm_mem" stages messages of up to max_batch_size tokens (a decode
    step's) in symmetric memory. Call before setup_caches(). Raises ValueError if the world size
    does not fit, or symm_mem is asked for off CUDA.
    """
    world = world_size() if world is None else world
    r = rank() if r is None else r
    c = model.config
    check_world_size(c, world)
    home = model.tok_embeddings.weight.device if device is None else device  # where the shards go
    check_all_reduce(all_reduce, home)
    if world == 1:
        return model
    hd = c.head_dim
    q_size, kv_size = c.n_head * hd, c.n_local_heads * hd
    group_name = dist.group.WORLD.group_name
    symm_mem_bytes = 0
    if all_reduce == "symm_mem":
        # A decode step's message, [B, 1, dim], at 4 bytes an element (fp32, the widest dtype the
        # kernel takes): load_model casts the model to its dtype after sharding.
        symm_mem_bytes = max_batch_size * c.dim * 4
        set_up_symm_mem(symm_mem_bytes, home, group_name)
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
            module.tp_group_name = group_name
            module.tp_symm_mem_bytes = symm_mem_bytes
            module.register_forward_hook(_all_reduce_output)
    model.vocab_shard = VocabShard(c.vocab_size, world, r, group_name)
    # Tied embeddings (no output layer) keep the table whole: Transformer.forward multiplies by a
    # view of this rank's rows.
    if model.output is not None:
        _output_rows(model.output, model.vocab_shard, model.output.weight.device if device is None else device)
    # Per-rank counts: setup_caches() sizes each rank's caches by c.n_local_heads. head_dim is
    # kept as it was (ModelArgs.__post_init__ would recompute it from the sharded n_head).
    c.n_head //= world
    c.n_local_heads //= world
    c.intermediate_size //= world
    model.tp_world_size = world
    return model
