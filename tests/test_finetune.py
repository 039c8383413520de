"""examples/finetune.py, the main job, under `accelerate launch` on 2 CPU processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.distributed
@pytest.mark.parametrize("engine", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_accelerate_launch_finetune_runs_and_saves_a_loadable_checkpoint(tmp_path, engine):
    from transformers import AutoModelForCausalLM

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), str(ROOT / "examples" / "finetune.py"),
           "--seq-len", "192", "--max-steps", "3", "--batch-size", "1", "--grad-accum", "2",
           "--eval-examples", "4", "--output-dir", str(tmp_path / "out"), *engine]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 processes on cpu: 1 data-parallel x 2 context-parallel" in run.stdout
    assert "peak memory per rank (GiB)" in run.stdout
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["cp_size"] == 2 and metrics["eval_examples"] == 4
    assert metrics["train_loss"] > 0 and metrics["eval_loss"] > 0 and metrics["tokens_per_second"] > 0
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and len(metrics["peak_memory_gib_per_rank"]) == 2
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.model_type == "llama"
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "out" / "model.safetensors")  # every weight, whole (not a shard)
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_single_process_cpu_launch_is_refused_with_the_working_command(monkeypatch):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import finetune
    finally:
        sys.path.pop(0)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit, match="--multi_gpu --num_processes N"):
        finetune.refuse_single_process_cpu_launch()


def test_real_text_is_packed_into_rows_with_restarting_positions(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import finetune
    finally:
        sys.path.pop(0)

    class Tokenizer:  # one token per character; 0 ends a document
        eos_token_id = 0

        def __call__(self, text):
            return {"input_ids": [ord(c) for c in text]}

    data = tmp_path / "corpus.jsonl"
    data.write_text('{"text": "abc"}\n{"text": "defgh"}\n\n{"text": "ij"}\n')
    docs = finetune.load_documents(str(data), "text")
    assert docs == ["abc", "defgh", "ij"]
    rows = finetune.packed_examples(docs, Tokenizer(), seq_len=5)
    # tokens: a b c 0 | d e f g h 0 | i j 0  -> rows of 5, the remainder dropped
    assert [r["input_ids"].tolist() for r in rows] == [[97, 98, 99, 0, 100], [101, 102, 103, 104, 0]]
    assert [r["position_ids"].tolist() for r in rows] == [[0, 1, 2, 3, 0], [1, 2, 3, 4, 5]]
    assert all(torch.equal(r["labels"], r["input_ids"]) for r in rows)
