"""Plain PyTorch + HF transformers (float32), hand loops: W-SFT, W-GEN, W-GRPO.

As ../shared/peers/torch_hf_bench.py. W-SFT: LlamaForCausalLM(labels=input_ids) CE,
torch.optim.AdamW(lr). W-GEN: model.generate(do_sample, temperature 1.0, top_k 0, top_p
1.0, exactly new_tokens tokens via min_new_tokens), DynamicCache, sdpa. W-GRPO: a
hand-written GRPO step (no framework overhead; the torch floor for W-GRPO): sample,
reward = fraction of even ids, group-normalised advantages, clipped surrogate + beta k3 KL
to a frozen reference, one AdamW step.
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
VERSIONS = {"torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads()}


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


def make_model(quick: bool, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(make_config(W.model(quick))).to(torch.float32)


def w_sft(quick: bool) -> list[dict]:
    s, c = W.sft(quick), W.model(quick)
    B, T = s["batch"], s["seq"]
    model = make_model(quick)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"])
    ids = torch.randint(0, c["vocab_size"], (B, T), generator=torch.Generator().manual_seed(1))
    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())

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
                            "attn_impl": model.config._attn_implementation},
                     versions=VERSIONS)]


@torch.inference_mode()
def sample(model, prompts, new_tokens, temperature):
    return model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                          do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          pad_token_id=0, eos_token_id=2)


def w_gen(quick: bool) -> list[dict]:
    g, c = W.gen(quick), W.model(quick)
    B, P, N = g["batch"], g["prompt_len"], g["new_tokens"]
    model = make_model(quick).eval()
    prompts = torch.randint(3, c["vocab_size"], (B, P),
                            generator=torch.Generator().manual_seed(2))
    for _ in range(g["warmup"]):
        out = sample(model, prompts, N, g["temperature"])
    ts = []
    for _ in range(g["reps"]):
        t0 = time.perf_counter()
        out = sample(model, prompts, N, g["temperature"])
        ts.append(time.perf_counter() - t0)
    assert out.shape == (B, P + N), out.shape
    return [W.record(PEER, "W-GEN", ts, tokens_per_iter=B * N,
                     extra={"generate": "HF generate, DynamicCache, sdpa"}, versions=VERSIONS)]


def token_logps(model, seq, n_prompt):
    logits = model(input_ids=seq).logits[:, n_prompt - 1:-1, :]
    return torch.log_softmax(logits.float(), dim=-1).gather(
        -1, seq[:, n_prompt:].unsqueeze(-1)).squeeze(-1)


def w_grpo(quick: bool) -> list[dict]:
    g, c = W.grpo(quick), W.model(quick)
    NP, G, P, N = g["num_prompts"], g["group_size"], g["prompt_len"], g["new_tokens"]
    beta, eps = g["beta"], g["eps_clip"]
    policy = make_model(quick)
    ref = copy.deepcopy(policy).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=g["lr"])
    gen = torch.Generator().manual_seed(3)

    def step():
        prompts = torch.randint(3, c["vocab_size"], (NP, P), generator=gen).repeat_interleave(G, 0)
        t0 = time.perf_counter()
        policy.eval()
        seq = sample(policy, prompts, N, g["temperature"]).clone()  # leave inference mode
        t1 = time.perf_counter()
        reward = (seq[:, P:] % 2 == 0).float().mean(-1)
        r = reward.view(NP, G)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1, 1)
        with torch.no_grad():
            ref_lp = token_logps(ref, seq, P)
        t2 = time.perf_counter()
        policy.train()
        opt.zero_grad(set_to_none=True)
        lp = token_logps(policy, seq, P)
        ratio = torch.exp(lp - lp.detach())
        surr = torch.min(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + eps) * adv)
        d = ref_lp - lp
        kl = torch.exp(d) - d - 1
        loss = -(surr - beta * kl).mean(-1).mean()
        loss.backward()
        opt.step()
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
                            "reward_mean_last": rw, "variant": "hand GRPO"},
                     versions=VERSIONS)]


WORKLOADS = {"sft": w_sft, "gen": w_gen, "grpo": w_grpo}
