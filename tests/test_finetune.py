"""examples/finetune.py, the main job: under `accelerate launch` on 2 CPU processes (distributed
tests), and its argument, data and checkpoint handling without launching."""

import json
import math
import os
import string
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from helpers import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finetune():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import finetune
    finally:
        sys.path.pop(0)
    return finetune


def launch_finetune(cwd: Path, *args: str, script: str = "finetune.py"):
    """`accelerate launch` examples/finetune.py (or ``script``) on 2 CPU processes; returns the
    finished run."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), str(ROOT / "examples" / script), *args]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


@pytest.mark.distributed
def test_trainer_example_runs_as_the_readme_says(tmp_path):
    run = launch_finetune(tmp_path, "--seq-len", "128", "--max-steps", "2", "--output-dir", str(tmp_path / "out"),
                          script="trainer.py")
    loss = float(run.stdout.split("eval loss (answer digits): ")[1].split()[0])
    assert math.isfinite(loss) and loss > 0
    assert (tmp_path / "out" / "checkpoint-2").is_dir()


@pytest.mark.distributed
@pytest.mark.parametrize("engine", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_accelerate_launch_finetune_runs_and_saves_a_loadable_checkpoint(tmp_path, engine):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run = launch_finetune(tmp_path, "--seq-len", "192", "--max-steps", "3", "--batch-size", "1", "--grad-accum", "2",
                          "--eval-examples", "4", "--log-steps", "2", "--output-dir", str(tmp_path / "out"), *engine)
    assert "2 processes on cpu: 1 data-parallel x 2 context-parallel" in run.stdout
    assert "peak memory per rank (GiB)" in run.stdout
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["cp_size"] == 2 and metrics["eval_examples"] == 4
    assert metrics["train_loss"] > 0 and metrics["eval_loss"] > 0 and metrics["tokens_per_second"] > 0
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and len(metrics["peak_memory_gib_per_rank"]) == 2
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.model_type == "llama"
    saved = load_file(tmp_path / "out" / "model.safetensors")  # every weight, whole (not a shard)
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in model.state_dict().items()}
    # output captured to a pipe: plain progress lines every --log-steps steps and at the end, no
    # carriage-return progress bars
    progress = [line.split()[1] for line in run.stdout.splitlines() if line.startswith("step ")]
    assert progress == ["2/3", "3/3"]
    assert "\r" not in run.stdout + run.stderr


def tiny_model_with_tokenizer(path: Path) -> Path:
    """A tiny Llama with tied embeddings (as Llama 3.2 1B has) and a one-character-per-token
    tokenizer, saved for ``--model``."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(string.ascii_lowercase + " .")}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab, [])),
                                        eos_token="</s>", pad_token="<pad>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         pad_token_id=0, bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.distributed
def test_a_resumed_run_continues_bit_for_bit_across_an_epoch_end(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    model = tiny_model_with_tokenizer(tmp_path / "model")
    words = "ring attention splits long sequences over ranks".split()
    docs = [" ".join(words[i:] + words[:i])[:32] for i in range(10)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    # 10 documents of 32 characters + </s> pack into 10 rows of 32 tokens: 1 held out, 9 to train
    # on in 5 micro-batches of 2 rows, so an epoch is 3 steps of 2, 2 and 1 micro-batches
    common = ["--model", str(model), "--dataset", str(tmp_path / "corpus.jsonl"), "--seq-len", "32",
              "--batch-size", "2", "--grad-accum", "2", "--eval-examples", "2", "--max-steps", "6", "--log-steps", "1"]
    launch_finetune(tmp_path, *common, "--output-dir", "full", "--save-steps", "2")
    resumed = launch_finetune(tmp_path, *common, "--output-dir", "resumed", "--resume", "full/checkpoint-2")
    assert "resumed from full/checkpoint-2 at step 2" in resumed.stdout

    def job(step):
        return json.loads((tmp_path / "full" / f"checkpoint-{step}" / "job.json").read_text())["position"]

    assert [job(2), job(4), job(6)] == [{"step": 2, "epoch": 0, "batches": 4}, {"step": 4, "epoch": 1, "batches": 2},
                                        {"step": 6, "epoch": 2, "batches": 0}]

    def log(run):
        return [json.loads(line) for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]

    # steps 3 to 6 of the resumed run are those of the uninterrupted one: the same losses and
    # learning rates, exactly, and the same final weights, bit for bit
    assert [r["step"] for r in log("full")] == [1, 2, 3, 4, 5, 6]
    assert log("resumed") == log("full")[2:]
    full, again = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert full.keys() == again.keys() and all(torch.equal(full[k], again[k]) for k in full)

    # the tokenizer is saved beside the weights; real text is evaluated by loss and perplexity
    for run in ("full", "resumed"):
        assert AutoTokenizer.from_pretrained(tmp_path / run)("ring a")["input_ids"] == [19, 10, 15, 8, 28, 2]
        metrics = json.loads((tmp_path / run / "metrics.json").read_text())
        assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-12)
        assert metrics["eval_tokens"] == 31 and metrics["eval_examples"] == 1 and "eval_accuracy" not in metrics


def test_single_process_cpu_launch_is_refused_with_the_working_command(finetune, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit, match="--multi_gpu --num_processes N"):
        finetune.refuse_single_process_cpu_launch()


def test_real_text_is_packed_into_rows_with_restarting_positions(finetune, tmp_path):
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


# ---------------------------------------------------------------------------- data errors
def test_malformed_json_names_the_file_and_line(finetune, tmp_path):
    data = tmp_path / "corpus.jsonl"
    data.write_text('{"text": "a"}\n\n{"text": "b",}\n')
    with pytest.raises(finetune.InputError, match=r"corpus.jsonl line 3: not valid JSON \(.*column 14\)"):
        finetune.load_documents(str(data), "text")
    data.write_text('{"text": "a"}\n["b"]\n')
    with pytest.raises(finetune.InputError, match=r"corpus.jsonl line 2: a JSON list, not an object"):
        finetune.load_documents(str(data), "text")


def test_a_missing_field_names_the_line_the_fields_and_the_flag(finetune, tmp_path):
    data = tmp_path / "corpus.jsonl"
    data.write_text('{"text": "a"}\n{"content": "b", "id": 2}\n')
    with pytest.raises(finetune.InputError, match=r"corpus.jsonl line 2: no field 'text' \(its fields: "
                                                  r"'content', 'id'\); name the text field with --text-field"):
        finetune.load_documents(str(data), "text")
    data.write_text('{"content": "a"}\n{"content": 7}\n')
    with pytest.raises(finetune.InputError, match=r"line 2: field 'content' is a int, not text"):
        finetune.load_documents(str(data), "content")
    # a .json file may also hold a list of objects
    listed = tmp_path / "corpus.json"
    listed.write_text('[{"content": "a"}, {"content": "b"}]')
    assert finetune.load_documents(str(listed), "content") == ["a", "b"]
    listed.write_text('[{"content": "a"}, {"text": "b"}]')
    with pytest.raises(finetune.InputError, match=r"corpus.json item 1: no field 'content'"):
        finetune.load_documents(str(listed), "content")


def test_a_mistyped_path_is_a_missing_file_not_a_hub_name(finetune, tmp_path, monkeypatch):
    (tmp_path / "corpus.jsonl").write_text('{"text": "a"}\n')
    typo = str(tmp_path / "corpus.jsnol")
    with pytest.raises(finetune.InputError, match=r"no such file '.*corpus.jsnol' \(did you mean '.*corpus.jsonl'\?\)"):
        finetune.load_documents(typo, "text")
    with pytest.raises(finetune.InputError, match=r"no such file 'notes.txt'"):
        finetune.load_documents(f"{tmp_path / 'corpus.jsonl'},notes.txt", "text")
    with pytest.raises(finetune.InputError, match=r"no such file 'missing/corpus.jsonl' \(no folder 'missing'\)"):
        finetune.load_documents("missing/corpus.jsonl", "text")
    # an owner/name without a file suffix is a 🤗 datasets name
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(finetune.InputError, match=r"'someone/corpus' is not a local file, and loading it .* `pip install datasets`"):
        finetune.load_documents("someone/corpus", "text")


# ------------------------------------------------------------------------ argument errors
def test_a_bad_argument_is_reported_once_and_every_process_exits_with_status_2(finetune, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    cases = [(["--seq-len", "5"], "--seq-len must be at least 17 for the passkey task, got 5"),
             (["--max-steps", "many"], "argument --max-steps: invalid int value: 'many'"),
             (["--dataset", str(tmp_path / "corpus.jsonl"), "--model", "m"], "no such file")]
    for argv, message in cases:
        for local_rank in ("0", "1"):
            monkeypatch.setenv("LOCAL_RANK", local_rank)
            with pytest.raises(SystemExit) as exited:
                finetune.main([*argv, "--output-dir", str(out)])
            assert exited.value.code == 2
            printed = capsys.readouterr()
            if local_rank == "0":
                assert printed.err.count("error:") == 1 and message in printed.err, printed.err
            else:  # the other processes of a machine exit quietly
                assert printed.out == printed.err == ""
    assert not out.exists()


def test_a_non_empty_output_dir_is_kept_without_overwrite_or_resume(finetune, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("an earlier run's model")
    with pytest.raises(SystemExit) as exited:
        finetune.main(["--output-dir", str(out), "--seq-len", "32", "--max-steps", "1"])
    assert exited.value.code == 2
    assert "is not empty (model.safetensors); pass --overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").read_text() == "an earlier run's model"

    def check(*argv):
        args = finetune.parse_args(["--output-dir", str(out), *argv])
        finetune.check_output_dir(args, finetune.find_checkpoint(args))

    check("--overwrite")
    with pytest.raises(finetune.InputError, match=r"--resume latest: no checkpoint in"):
        check("--resume", "latest")
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "job.json").write_text("{}")
    check("--resume", "latest")  # resuming into the run's own folder is allowed
    check("--resume", str(out / "checkpoint-3"))
    with pytest.raises(finetune.InputError, match=r"--overwrite would delete the checkpoint"):
        check("--resume", "latest", "--overwrite")


def test_resume_finds_the_newest_complete_checkpoint_and_refuses_other_arguments(finetune, tmp_path):
    out = tmp_path / "out"
    defaults = finetune.parse_args([])
    for step in (2, 10, 4):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        job = {"position": {"step": step, "epoch": 0, "batches": 2 * step},
               "args": {k: getattr(defaults, k) for k in finetune.RUN_ARGS}, "processes": 2, "cp_size": 2}
        (out / f"checkpoint-{step}" / "job.json").write_text(json.dumps(job))
    (out / "checkpoint-12.partial").mkdir()  # a save that did not complete
    (out / "checkpoint-14").mkdir()  # no job.json: not complete either
    args = finetune.parse_args(["--output-dir", str(out), "--resume", "latest"])
    assert finetune.find_checkpoint(args) == out / "checkpoint-10"
    assert finetune.check_resume(args, out / "checkpoint-10", 2, 2)["position"]["step"] == 10
    with pytest.raises(finetune.InputError, match=r"--batch-size 4 \(now 8\); --lr 0.002 \(now 0.001\)\. Resume with"):
        finetune.check_resume(finetune.parse_args(["--batch-size", "8", "--lr", "1e-3"]), out / "checkpoint-10", 2, 2)
    with pytest.raises(finetune.InputError, match=r"2 processes with --cp-size 2 \(now 4 with 2\)"):
        finetune.check_resume(args, out / "checkpoint-10", 4, 2)
    with pytest.raises(finetune.InputError, match=r"--resume '.*nowhere': no such folder"):
        finetune.find_checkpoint(finetune.parse_args(["--resume", str(tmp_path / "nowhere")]))
    finetune.prune_checkpoints(out, keep=2)
    assert [p.name for p in finetune.checkpoints(out)] == ["checkpoint-4", "checkpoint-10"]


def test_the_timeout_reaches_the_process_group(finetune, tmp_path, monkeypatch):
    from accelerate.utils import InitProcessGroupKwargs

    class Stop(Exception):
        pass

    given = {}

    def accelerator(**kwargs):
        given.update(kwargs)
        raise Stop

    monkeypatch.setattr(finetune, "Accelerator", accelerator)
    for argv, seconds in ((["--timeout", "42"], 42), ([], 600)):
        with pytest.raises(Stop):
            finetune.main([*argv, "--output-dir", str(tmp_path / "out"), "--seq-len", "32"])
        (handler,) = [h for h in given["kwargs_handlers"] if isinstance(h, InitProcessGroupKwargs)]
        assert handler.timeout == timedelta(seconds=seconds)


def test_progress_without_a_terminal_is_a_plain_line_every_n_steps(finetune, capsys):
    progress = finetune.Progress(total=25, initial=0, every=10, enabled=True, terminal=False)
    for step in range(1, 26):
        progress.step(step, loss=float(step), tokens_per_second=1234.0)
    progress.close()
    resumed = finetune.Progress(total=25, initial=20, every=10, enabled=True, terminal=False)
    for step in range(21, 26):
        resumed.step(step, loss=float(step), tokens_per_second=1234.0)
    printed = capsys.readouterr()
    lines = printed.out.splitlines()
    assert [line.split()[:4] for line in lines] == [["step", "10/25", "loss", "5.5000"], ["step", "20/25", "loss", "15.5000"],
                                                    ["step", "25/25", "loss", "23.0000"], ["step", "25/25", "loss", "23.0000"]]
    assert all("1,234 tokens/s" in line for line in lines)
    assert printed.err == "" and "\r" not in printed.out


def test_the_training_order_depends_on_the_seed_and_epoch_only(finetune):
    def order(seed, epoch):
        sampler = finetune.EpochSampler(50, seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert sorted(order(0, 0)) == list(range(50))
    assert order(0, 3) == order(0, 3)
    assert len({tuple(order(0, 0)), tuple(order(0, 1)), tuple(order(1, 0))}) == 3
