"""RingAttention as a layer of your own model (the README example), checked against plain
attention over the whole sequence with the same weights: the output, and the parameter
gradients averaged over the ranks.

    python examples/ring_attention_module.py                              # one process
    torchrun --nproc_per_node 2 examples/ring_attention_module.py         # 2 processes, gloo (CPU)
"""

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hf_ring_attention import RingAttention
from hf_ring_attention.module import apply_rotary, rotary_cos_sin

if "RANK" in os.environ:  # launched by torchrun: join its process group (gloo runs on CPU)
    dist.init_process_group("gloo")

torch.manual_seed(0)  # the same weights and tokens on every rank

# --- the README example
attn = RingAttention(dim=512, dim_head=64, heads=8, causal=True, auto_shard_seq=True)
tokens = torch.randn(1, 1024, 512)
attended = attn(tokens)            # same shape; equal to plain attention over the whole sequence
assert attended.shape == tokens.shape

# --- the check: plain attention over the whole sequence on this process, with the same weights
q, k, v = (proj(tokens[0]).view(1024, 8, 64) for proj in (attn.to_q, attn.to_k, attn.to_v))
cos, sin = rotary_cos_sin(torch.arange(1024), 64, q.dtype, q.device)
q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
plain = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
expected = attn.to_out(plain.transpose(0, 1).reshape(1024, 512))
error = (attended[0] - expected).abs().max().item()

# --- gradients: every rank holds P x the share of its own tokens; their mean over the ranks is
# the single-process gradient (DistributedDataParallel over the group averages them for you)
params = list(attn.parameters())
grads = torch.autograd.grad(attended.square().mean(), params)
world_size = dist.get_world_size() if dist.is_initialized() else 1
for g in grads:
    if world_size > 1:
        dist.all_reduce(g)
    g /= world_size
expected_grads = torch.autograd.grad(expected.square().mean(), params)
grad_error = max(((g - e).norm() / e.norm()).item() for g, e in zip(grads, expected_grads))

if not dist.is_initialized() or dist.get_rank() == 0:
    print(f"{world_size} process(es): output {tuple(attended.shape)}, max |ring - plain attention| = "
          f"{error:.1e}; parameter gradients averaged over the ranks: relative error {grad_error:.1e}")
assert error < 1e-4 and grad_error < 1e-4, (error, grad_error)

if dist.is_initialized():
    dist.destroy_process_group()
