"""TRL (same env as torch + transformers), float32: GRPOTrainer (W-GRPO), SFTTrainer (W-SFT).

As ../shared/peers/trl_bench.py. The random tiny-llama is saved to a local folder and
passed by path (GRPOTrainer rebuilds its reference from the policy's name_or_path; no hub).
Tokenizer: a local `tokenizers` WordLevel over "<pad>" "<bos>" "<eos>" "<unk>" "t4".., so a
prompt of k "tN" words is k ids. TRL 1.x defaults set explicitly for a fair comparison:
gradient_checkpointing off (TRL_GC=1 keeps it on), loss_type "grpo", num_iterations 1.
Step time from a TrainerCallback (on_step_begin -> on_step_end); the rollout split from
wrapping `_generate` (sampling) and `_generate_and_score_completions` (sampling + reward +
reference log-probs): reference = the second minus the first, update = step minus the second.
"""

from __future__ import annotations

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, TrainerCallback  # noqa: E402

from benchmarks import workloads as W  # noqa: E402
from benchmarks.peers.torch_peer import make_model  # noqa: E402

PEER = "trl"
GC = os.environ.get("TRL_GC", "0") == "1"
VERSIONS = {"trl": trl.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "gradient_checkpointing": GC}


def make_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    vocab.update({f"t{i}": i for i in range(4, vocab_size)})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>",
                                  eos_token="<eos>", unk_token="<unk>")
    tok.padding_side = "left"
    return tok


class StepTimer(TrainerCallback):
    def __init__(self):
        self.t0, self.times = None, []

    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.t0)


def wrap(obj, name, store):
    orig = getattr(obj, name)

    def timed(*a, **k):
        t0 = time.perf_counter()
        r = orig(*a, **k)
        store.setdefault(name, []).append(time.perf_counter() - t0)
        return r
    setattr(obj, name, timed)


def even_fraction_ids(prompts, completions, completion_ids, **kw):
    return [sum(1 for t in ids if t % 2 == 0) / max(1, len(ids)) for ids in completion_ids]


def w_grpo(spec: W.Spec) -> list[dict]:
    from trl import GRPOConfig, GRPOTrainer
    g, c = W.grpo(spec), W.model(spec)
    NP, G, P, N = g["num_prompts"], g["group_size"], g["prompt_len"], g["new_tokens"]
    warm, steps = g["warmup"], g["steps"]
    out = tempfile.mkdtemp(prefix="bench_trl_")
    tok = make_tokenizer(c["vocab_size"])
    model = make_model(spec)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    mdir = os.path.join(out, "tiny-llama-random")
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    rng = np.random.default_rng(7)
    prompts = [" ".join(f"t{i}" for i in rng.integers(4, c["vocab_size"], P))
               for _ in range(NP * (warm + steps) * 2)]
    assert len(tok(prompts[0])["input_ids"]) == P
    cfg = GRPOConfig(
        output_dir=out, per_device_train_batch_size=NP * G, gradient_accumulation_steps=1,
        num_generations=G, max_completion_length=N, temperature=g["temperature"],
        top_k=0, top_p=1.0, beta=g["beta"], epsilon=g["eps_clip"], loss_type="grpo",
        num_iterations=1, learning_rate=g["lr"], lr_scheduler_type="constant",
        max_steps=warm + steps, logging_steps=1, save_strategy="no", report_to=[],
        use_vllm=False, bf16=False, fp16=False, use_cpu=True, seed=0,
        generation_kwargs={"min_new_tokens": N}, dataloader_num_workers=0,
        disable_tqdm=True, log_completions=False, model_init_kwargs={"dtype": torch.float32},
        gradient_checkpointing=GC)
    trainer = GRPOTrainer(model=mdir, reward_funcs=even_fraction_ids, args=cfg,
                          train_dataset=Dataset.from_dict({"prompt": prompts}),
                          processing_class=tok)
    timer = StepTimer()
    trainer.add_callback(timer)
    phases: dict[str, list[float]] = {}
    wrap(trainer, "_generate", phases)
    wrap(trainer, "_generate_and_score_completions", phases)
    try:
        trainer.train()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    ts = timer.times[warm:]
    gen = phases.get("_generate", [])[warm:]
    gs = phases.get("_generate_and_score_completions", [])[warm:]
    extra = {"variant": "GRPOTrainer", "all_steps_s": [round(x, 3) for x in timer.times],
             "loss_type": "grpo", "gradient_checkpointing": GC}
    if gen and gs:
        extra.update(rollout_median=statistics.median(gen),
                     reference_median=statistics.median([b - a for a, b in zip(gen, gs)]),
                     update_median=statistics.median([s - b for s, b in zip(ts, gs)]))
    hist = [h for h in trainer.state.log_history if "reward" in h]
    if hist:
        extra["reward_mean_last"] = hist[-1].get("reward")
    return [W.record(PEER, "W-GRPO", ts, tokens_per_iter=NP * G * N, extra=extra,
                     versions=VERSIONS)]


def w_sft(spec: W.Spec) -> list[dict]:
    from trl import SFTConfig, SFTTrainer
    s, c = W.sft(spec), W.model(spec)
    B, T = s["batch"], s["seq"]
    warm, steps = s["warmup"], s["steps"]
    out = tempfile.mkdtemp(prefix="bench_trl_")
    rng = np.random.default_rng(1)
    rows = rng.integers(4, c["vocab_size"], (B * (warm + steps) * 2, T)).tolist()
    cfg = SFTConfig(output_dir=out, per_device_train_batch_size=B, gradient_accumulation_steps=1,
                    learning_rate=s["lr"], lr_scheduler_type="constant",
                    max_steps=warm + steps, max_length=T, packing=False,
                    completion_only_loss=False, logging_steps=1, save_strategy="no",
                    report_to=[], bf16=False, fp16=False, use_cpu=True, seed=0,
                    dataloader_num_workers=0, disable_tqdm=True, gradient_checkpointing=GC)
    trainer = SFTTrainer(model=make_model(spec), args=cfg,
                         train_dataset=Dataset.from_dict({"input_ids": rows}),
                         processing_class=make_tokenizer(c["vocab_size"]))
    timer = StepTimer()
    trainer.add_callback(timer)
    try:
        trainer.train()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    ts = timer.times[warm:]
    fl = W.sft_flops_per_step(s, c)
    return [W.record(PEER, "W-SFT", ts, tokens_per_iter=B * T,
                     extra={"variant": "SFTTrainer", "flops_per_step": fl,
                            "achieved_gflops": fl / statistics.median(ts) / 1e9,
                            "gradient_checkpointing": GC,
                            "all_steps_s": [round(x, 3) for x in timer.times]},
                     versions=VERSIONS)]


WORKLOADS = {"sft": w_sft, "grpo": w_grpo}
