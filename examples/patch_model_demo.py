"""patch_model + shard_batch on two CPU processes: a Llama trained on its shards gives exactly the
loss and gradients of the unpatched model on the whole batch.

    python examples/patch_model_demo.py               # 2 processes, gloo, CPU
    python examples/patch_model_demo.py --world-size 4
"""

import argparse
import copy
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

from hf_ring_attention import patch_model, shard_batch


def worker(rank, world_size, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)  # same model and batch on every rank
    config = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    reference = copy.deepcopy(model)

    model = patch_model(model)  # the one-liner

    # two rows of 300 tokens, the second right-padded after 211 tokens
    input_ids = torch.randint(0, 1000, (2, 300))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 211:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    local = shard_batch(batch)  # this rank's tokens, global positions, shift_labels, num_items_in_batch
    loss = model(**local).loss  # this rank's share of the token-mean loss
    loss.backward()
    for p in model.parameters():  # a data-parallel wrapper would do this reduction (see README)
        dist.all_reduce(p.grad)
    dist.all_reduce(loss := loss.detach().clone())

    if rank == 0:  # the unpatched model on the whole batch, on one process
        ref = reference(**batch)
        ref.loss.backward()
        grad_err = max(((p.grad - r.grad).norm() / r.grad.norm()).item()
                       for p, r in zip(model.parameters(), reference.parameters()))
        print(f"{world_size} ranks, {local['input_ids'].shape[1]} tokens per rank: loss {loss.item():.6f} "
              f"(one device: {ref.loss.item():.6f}); max relative gradient error {grad_err:.1e}")
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=2, help="number of CPU processes (default 2)")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args.world_size, port), nprocs=args.world_size)


if __name__ == "__main__":
    main()
