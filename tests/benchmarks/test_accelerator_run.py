"""`python -m benchmarks.run --model llama3.2-1b --dtype bfloat16`, the accelerator run of
issue 14 item 4: the 1B model's dims, the scaled workloads, the bytes a sampling call must
read, MFU against the run's peak and a spec sheet, the memory bandwidth, the peers that take
part; and (on this CPU, shrunk with --quick) that the jaxpost, plain-JAX and torch workers and
the peak probe run in bfloat16 and record what the report divides."""

import math

import numpy as np
import pytest

from benchmarks import report, run
from benchmarks import workloads as W


def test_the_1b_dims_are_llama_3_2_1b_and_jaxposts_preset():
    # Llama 3.2 1B: 1,235,814,400 parameters (embeddings tied).
    assert W.param_counts(W.LLAMA_1B)["total"] == 1_235_814_400
    from jaxpost.models import param_shapes, preset
    shapes = param_shapes(preset("llama3.2-1b"))
    import jax
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    assert n == W.param_counts(W.LLAMA_1B)["total"]
    # Every matmul weight once per token, the tied head included: the layers + V x d.
    assert W.param_counts(W.LLAMA_1B)["matmul"] == 16 * 60_817_408 + 128256 * 2048


def test_specs_scale_the_workloads_and_keep_the_dtype_under_quick():
    big = W.Spec("llama3.2-1b", "bfloat16")
    assert (W.sft(big)["batch"], W.sft(big)["seq"], W.sft(big)["lr"]) == (8, 1024, 1e-4)
    assert W.grpo(big)["num_prompts"] * W.grpo(big)["group_size"] == 64
    assert W.grpo(big)["beta"] == W.W_GRPO["beta"]  # only the shapes change
    assert W.model(big)["dtype"] == "bfloat16" and W.model(big)["tie_embeddings"]
    assert W.matmul(big)[0] == (4096, 8192)
    quick = W.Spec("llama3.2-1b", "bfloat16", quick=True)
    assert W.model(quick)["hidden_size"] == 64 and W.model(quick)["dtype"] == "bfloat16"
    assert W.model(quick)["tie_embeddings"] and W.sft(quick)["seq"] == 32
    assert W.model() == W.TINY_LLAMA and W.sft() == W.W_SFT  # the CPU workloads unchanged
    assert quick.argv() == ["--model", "llama3.2-1b", "--dtype", "bfloat16", "--quick"]
    with pytest.raises(ValueError, match="model 'gpt2'; known: tiny-llama, llama3.2-1b"):
        W.Spec("gpt2")
    with pytest.raises(ValueError, match="dtype 'int8'"):
        W.Spec(dtype="int8")


def test_decode_bytes_by_hand():
    c = dict(W.TINY_LLAMA, vocab_size=10, hidden_size=4, intermediate_size=6, num_layers=2,
             num_heads=2, num_kv_heads=1, head_dim=2, dtype="bfloat16")
    # matmul weights: 2 layers x (q 4x4 + k 4x2 + v 4x2 + o 4x4 + mlp 3x4x6) + head 10x4 = 280
    assert W.param_counts(c)["matmul"] == 2 * (16 + 8 + 8 + 16 + 72) + 40
    # 3 new tokens from 5-token prompts, 2 rows: 3 reads of the weights (prefill + 2 decode
    # steps), then the cache: steps 1 and 2 read 6 and 7 slots of k and v, 2 layers x 1
    # head x 2 wide x 2 bytes x 2 rows each.
    per_slot = 2 * 2 * 1 * 2 * 2 * 2
    assert W.decode_bytes(c, rows=2, prompt_len=5, new_tokens=3) == 3 * 280 * 2 + per_slot * 13


def test_nominal_peaks_by_device_kind():
    assert W.nominal_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
    assert W.nominal_tflops("TPU v5 lite", "bfloat16") == 197.0
    assert W.nominal_tflops("cpu", "float32") is None
    assert W.nominal_tflops("NVIDIA H100", "float16") is None  # no entry: no MFU (spec)


def _jobs():
    peak = [{"framework": "jax", "n": 8192, "dtype": "bfloat16", "gflops_median": 800e3},
            {"framework": "jax", "bytes": 2, "dtype": "bfloat16", "gbps_median": 3000.0},
            {"framework": "torch", "bytes": 2, "dtype": "bfloat16", "gbps_median": 2500.0}]
    sft = {"workload": "W-SFT", "all": [0.5, 0.5], "median": 0.5, "tokens_per_iter": 8192,
           "flops_per_step": 200e12, "dtype": "bfloat16", "device_kind": "NVIDIA H100 PCIe"}
    gen = {"workload": "W-GEN", "all": [2.0], "median": 2.0, "tokens_per_iter": 8192,
           "decode_bytes": 3e12}
    grpo = {"workload": "W-GRPO", "all": [3.0], "median": 3.0, "tokens_per_iter": 8192,
            "rollout_median": 1.0, "rollout_bytes": 600e9, "update_median": 2.0}
    return [{"peer": "matmul", "workload": "peak", "round": 1, "status": "ok",
             "records": peak, "peak_rss_mib": 1.0}] + [
        {"peer": "jaxpost", "workload": w, "round": 1, "status": "ok", "records": [r],
         "peak_rss_mib": 2.0} for w, r in (("sft", sft), ("gen", gen), ("grpo", grpo))]


def test_mfu_against_the_run_and_the_spec_sheet_and_sampling_against_bandwidth():
    jobs = _jobs()
    peak = report.matmul_peak(jobs)
    assert (peak["gflops"], peak["dtype"], peak["gbps"], peak["gbps_framework"]) == (
        800e3, "bfloat16", 3000.0, "jax")
    s = report.summarize(jobs, peak)
    sft, gen, grpo = (s[w]["jaxpost"] for w in ("W-SFT", "W-GEN", "W-GRPO"))
    # 200 TFLOP in 0.5 s = 400 TFLOP/s: half the run's 800, 0.404 of the H100's 989.4.
    assert math.isclose(sft["mfu"], 0.5) and math.isclose(sft["mfu_spec"], 400 / 989.4)
    # 3 TB in 2 s = 1500 GB/s, half of 3000; the rollout 600 GB in 1 s, a fifth.
    assert math.isclose(gen["gbps"], 1500.0) and math.isclose(gen["bandwidth_fraction"], 0.5)
    assert math.isclose(grpo["rollout_gbps"], 600.0)
    assert math.isclose(grpo["rollout_bandwidth_fraction"], 0.2)
    table = report.render({
        "started_utc": "t", "command": "python -m benchmarks.run --model llama3.2-1b",
        "git": "abc", "options": {"rounds": 1, "quick": False, "peers": ["jaxpost"],
                                  "model": "llama3.2-1b", "dtype": "bfloat16"},
        "machine": {"cpu_model": "cpu", "cores": 16, "device": "1 x NVIDIA H100 PCIe",
                    "loadavg_before": [0], "loadavg_after": [0]},
        "peers": {}, "jobs": jobs, "peak": peak, "summary": s})
    lines = table.splitlines()
    assert "Model llama3.2-1b, bfloat16; jaxpost commit abc; rounds 1" in lines
    assert "device 1 x NVIDIA H100 PCIe" in table
    assert "| jaxpost | 0.500 | 0.500–0.500 | 16384 | 1.00× | 0.50 | 0.40 | 2 | 2 | 0.500 |" \
        in lines
    assert "| jaxpost | 2.000 | 2.000–2.000 | 4096 | 1.00× | 1500.0 (0.50) | 2 | 1 | 2.000 |" \
        in lines
    assert any(x.startswith("| jaxpost | 3.000 |") and "| 600.0 (0.20) |" in x for x in lines)
    assert "bfloat16 matmul peak of this run: **800000 GFLOP/s**" in table
    assert "**3000.0 GB/s** (jax)" in table


def test_the_accelerator_run_takes_the_peers_that_scale():
    args = run.parse_args(["--model", "llama3.2-1b", "--dtype", "bfloat16"])
    assert args.peers == ["jaxpost", "jax", "torch"]
    assert run.parse_args([]).peers == list(run.PEER_WORKLOADS)  # the CPU run: everyone
    with pytest.raises(SystemExit):
        run.parse_args(["--model", "llama3.2-1b", "--peers", "jaxpost,tunix"])
    with pytest.raises(SystemExit):
        run.parse_args(["--dtype", "float64"])


@pytest.mark.parametrize("peer, workloads", [
    pytest.param("jaxpost", ("sft", "gen", "grpo"), marks=pytest.mark.slow),  # ~26 s
    ("jax", ("sft", "gen")), ("torch", ("sft", "gen", "grpo"))])
def test_workers_run_the_shrunk_1b_model_in_bfloat16(peer, workloads):
    """The workers' bfloat16 paths on this CPU (--quick dims, tied embeddings): every
    record says its dtype and device, the losses are finite, the sampling records carry
    the bytes the report divides."""
    if peer == "torch":
        pytest.importorskip("torch")
        pytest.importorskip("transformers")
    import importlib
    module = importlib.import_module(f"benchmarks.peers.{peer}_peer")
    spec = W.Spec("llama3.2-1b", "bfloat16", quick=True)
    for w in workloads:
        (rec,) = module.WORKLOADS[w](spec)
        assert rec["dtype"] == "bfloat16" and rec["device_kind"], rec
        assert all(math.isfinite(t) and t > 0 for t in rec["all"])
        if w == "sft":
            # Small random weights: the first loss is about that of a uniform guess.
            assert abs(rec["loss_first"] - math.log(W.model(spec)["vocab_size"])) < 0.1, rec
            assert math.isfinite(rec["loss_last"])
            assert rec["flops_per_step"] == W.sft_flops_per_step(W.sft(spec), W.model(spec))
        if w == "gen":
            g = W.gen(spec)
            assert rec["decode_bytes"] == W.decode_bytes(W.model(spec), g["batch"],
                                                         g["prompt_len"], g["new_tokens"])
        if w == "grpo":
            assert rec["rollout_bytes"] > 0 and math.isfinite(rec["rollout_median"])


def test_the_peak_probe_in_bfloat16_measures_matmuls_and_bandwidth():
    from benchmarks.peers import matmul_peer
    recs = matmul_peer.peak(W.Spec("llama3.2-1b", "bfloat16", quick=True))
    frameworks = {r["framework"] for r in recs}
    assert "jax" in frameworks and "numpy" not in frameworks  # numpy: float32 only
    mm = [r for r in recs if "gflops_median" in r]
    bw = [r for r in recs if "gbps_median" in r]
    assert {r["n"] for r in mm if r["framework"] == "jax"} == set(W.QUICK_MATMUL_SIZES)
    assert all(r["dtype"] == "bfloat16" and r["gflops_median"] > 0 for r in mm)
    # 4 MiB of bfloat16 read and written once: 8 MiB moved a repetition.
    assert bw and all(r["bytes"] == 8 * 2 ** 20 and r["gbps_median"] > 0 for r in bw)
