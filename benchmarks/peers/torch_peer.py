"""Plain PyTorch + HF transformers, hand loops: W-SFT, W-GEN, W-GRPO.

As ../shared/peers/torch_hf_bench.py. W-SFT: LlamaForCausalLM(labels=input_ids) CE,
torch.optim.AdamW(lr). W-GEN: model.generate(do_sample, temperature 1.0, top_k 0, top_p
1.0, exactly new_tokens tokens via min_new_tokens), DynamicCache, sdpa. W-GRPO: a
hand-written GRPO step (no framework overhead; the torch floor for W-GRPO): sample,
reward = fraction of even ids, group-normalised advantages, clipped surrogate + beta k3 KL
to a frozen reference, one AdamW step. On a CUDA GPU when torch sees one, else the CPU;
in bfloat16 the usual mixed precision (float32 weights and AdamW, `torch.autocast` to
bfloat16 for training), generation on a bfloat16 copy of the model.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks import workloads as W

PEER = "torch"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VERSIONS = {"torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "device": DEVICE}


def _sync() -> None:
    """Waits for the device's queued work (timings on a GPU)."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _autocast(spec: W.Spec):
    """Mixed precision in the spec's dtype (off in float32)."""
    return torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=spec.dtype == "bfloat16")


def _device_kind() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"


def make_config(c: dict) -> LlamaConfig:
    cfg = LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_layers"],
        num_attention_heads=c["num_heads"], num_key_value_heads=c["num_kv_heads"],
        head_dim=c["head_dim"], rms_norm_eps=c["rms_norm_eps"],
        max_position_embeddings=c["max_position_embeddings"],
        tie_word_embeddings=c["tie_embeddings"], hidden_act="silu", attention_bias=False,
        mlp_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    # rope theta: transformers 4 reads rope_theta, 5 rope_parameters
    if isinstance(getattr(cfg, "rope_parameters", None), dict):
        cfg.rope_parameters["rope_theta"] = c["rope_theta"]
    cfg.rope_theta = c["rope_theta"]
    return cfg


def make_model(spec: W.Spec, seed: int = 0) -> LlamaForCausalLM:
    """float32 weights on the device (the inference copy is cast by its user)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(make_config(W.model(spec))).to(torch.float32).to(DEVICE)


def _ids(low: int, high: int, shape: tuple, seed: int) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed)
                         ).to(DEVICE)


def w_sft(spec: W.Spec) -> list[dict]:
    s, c = W.sft(spec), W.model(spec)
    B, T = s["batch"], s["seq"]
    model = make_model(spec)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"])
    ids = _ids(0, c["vocab_size"], (B, T), 1)
    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        with _autocast(spec):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())  # waits for the step

    for _ in range(s["warmup"]):
        step()
    ts = []
    for _ in range(s["steps"]):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    fl = W.sft_flops_per_step(s, c)
    return [W.record(PEER, "W-SFT", ts, tokens_per_iter=B * T,
                     extra={"flops_per_step": fl,
                            "achieved_gflops": fl / statistics.median(ts) / 1e9,
                            "loss_first": losses[0], "loss_last": losses[-1],
                            "attn_impl": model.config._attn_implementation,
                            "dtype": spec.dtype, "device_kind": _device_kind()},
                     versions=VERSIONS)]


@torch.inference_mode()
def sample(model, prompts, new_tokens, temperature):
    out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                         do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         pad_token_id=0, eos_token_id=2)
    _sync()
    return out


def w_gen(spec: W.Spec) -> list[dict]:
    g, c = W.gen(spec), W.model(spec)
    B, P, N = g["batch"], g["prompt_len"], g["new_tokens"]
    model = make_model(spec).eval()
    if spec.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    prompts = _ids(3, c["vocab_size"], (B, P), 2)
    for _ in range(g["warmup"]):
        out = sample(model, prompts, N, g["temperature"])
    ts = []
    for _ in range(g["reps"]):
        t0 = time.perf_counter()
        out = sample(model, prompts, N, g["temperature"])
        ts.append(time.perf_counter() - t0)
    assert out.shape == (B, P + N), out.shape
    return [W.record(PEER, "W-GEN", ts, tokens_per_iter=B * N,
                     extra={"generate": "HF generate, DynamicCache, sdpa", "dtype": spec.dtype,
                            "decode_bytes": W.decode_bytes(c, B, P, N),
                            "device_kind": _device_kind()}, versions=VERSIONS)]


def token_logps(model, seq, n_prompt):
    logits = model(input_ids=seq).logits[:, n_prompt - 1:-1, :]
    return torch.log_softmax(logits.float(), dim=-1).gather(
        -1, seq[:, n_prompt:].unsqueeze(-1)).squeeze(-1)


def w_grpo(spec: W.Spec) -> list[dict]:
    g, c = W.grpo(spec), W.model(spec)
    NP, G, P, N = g["num_prompts"], g["group_size"], g["prompt_len"], g["new_tokens"]
    beta, eps = g["beta"], g["eps_clip"]
    policy = make_model(spec)
    ref = copy.deepcopy(policy).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=g["lr"])
    gen = torch.Generator().manual_seed(3)

    def step():
        prompts = torch.randint(3, c["vocab_size"], (NP, P), generator=gen).repeat_interleave(
            G, 0).to(DEVICE)
        t0 = time.perf_counter()
        policy.eval()
        with _autocast(spec):
            seq = sample(policy, prompts, N, g["temperature"]).clone()  # leave inference mode
        t1 = time.perf_counter()
        reward = (seq[:, P:] % 2 == 0).float().mean(-1)
        r = reward.view(NP, G)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1, 1)
        with torch.no_grad(), _autocast(spec):
            ref_lp = token_logps(ref, seq, P)
        _sync()
        t2 = time.perf_counter()
        policy.train()
        opt.zero_grad(set_to_none=True)
        with _autocast(spec):
            lp = token_logps(policy, seq, P)
        ratio = torch.exp(lp - lp.detach())
        surr = torch.min(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + eps) * adv)
        d = ref_lp - lp
        kl = torch.exp(d) - d - 1
        loss = -(surr - beta * kl).mean(-1).mean()
        loss.backward()
        opt.step()
        _sync()
        t3 = time.perf_counter()
        return t3 - t0, t1 - t0, t2 - t1, t3 - t2, reward.mean().item()

    for _ in range(g["warmup"]):
        step()
    tot, rollout, ref_t, update = [], [], [], []
    for _ in range(g["steps"]):
        a, b, cc, d, rw = step()
        tot.append(a)
        rollout.append(b)
        ref_t.append(cc)
        update.append(d)
    return [W.record(PEER, "W-GRPO", tot, tokens_per_iter=NP * G * N,
                     extra={"rollout_median": statistics.median(rollout),
                            "reference_median": statistics.median(ref_t),
                            "update_median": statistics.median(update),
                            "reward_mean_last": rw, "variant": "hand GRPO",
                            "dtype": spec.dtype, "device_kind": _device_kind(),
                            "rollout_bytes": W.decode_bytes(c, NP * G, P, N)},
                     versions=VERSIONS)]


WORKLOADS = {"sft": w_sft, "gen": w_gen, "grpo": w_grpo}
