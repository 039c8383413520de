"""Context-parallel fine-tuning with the transformers Trainer and RingAttentionCallback.

    accelerate launch --multi_gpu --num_processes 2 examples/trainer.py        # CPU or 2 GPUs

Trains the small Llama of examples/finetune.py on its passkey-retrieval task with the Trainer;
the only addition to a plain Trainer script is the callback (it shards each batch by wrapping the
Trainer's data collator).
"""

import argparse

import torch
from transformers import Trainer, TrainingArguments

from finetune import PasskeyDataset, build_model, collate, refuse_single_process_cpu_launch
from hf_ring_attention.trainer import RingAttentionCallback


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default: 1024)")
    p.add_argument("--cp-size", type=int, default=None, help="ranks per context-parallel group (default: all)")
    p.add_argument("--max-steps", type=int, default=30, help="optimizer steps (default: 30)")
    p.add_argument("--output-dir", default="outputs/trainer", help="checkpoints (default: outputs/trainer)")
    args = p.parse_args()
    refuse_single_process_cpu_launch()

    ring = RingAttentionCallback(cp_size=args.cp_size)
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=2,
        per_device_eval_batch_size=2, gradient_accumulation_steps=2, learning_rate=2e-3, warmup_steps=5,
        logging_steps=5, eval_strategy="steps", eval_steps=args.max_steps, save_steps=args.max_steps,
        prediction_loss_only=True, use_cpu=not torch.cuda.is_available(), report_to=[],
        bf16=torch.cuda.is_available(),  # the GPU flash-attention kernels take 16-bit inputs
        ddp_find_unused_parameters=False,  # every parameter gets a gradient (saves DDP's search)
    )
    trainer = Trainer(
        model=build_model(argparse.Namespace(model=None, seq_len=args.seq_len)), args=training_args,
        train_dataset=PasskeyDataset(10_000, args.seq_len, seed=1, packed=True),
        eval_dataset=PasskeyDataset(16, args.seq_len, seed=2, packed=False),
        data_collator=collate, callbacks=[ring],
    )
    trainer.train()
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        print(f"eval loss (answer digits): {metrics['eval_loss']:.4f}")


if __name__ == "__main__":
    main()
