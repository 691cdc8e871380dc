"""`python -m benchmarks.run`: the table's arithmetic on hand-made records, peers that are
not installed or fail, and (slow) the --quick command end to end for jaxpost."""

import json
import math
import os
import stat
import subprocess
import sys

import pytest

from benchmarks import report, run, workloads
from benchmarks.peers import worker
from tests.cli_testing import ROOT


def _rec(workload, times, tokens=None, **extra):
    rec = {"workload": workload, "all": list(times), "median": sorted(times)[len(times) // 2],
           **extra}
    if tokens:
        rec["tokens_per_iter"] = tokens
    return rec


def _job(peer, workload, rnd, records, rss=None, status="ok"):
    return {"peer": peer, "workload": workload, "round": rnd, "status": status,
            "records": records, "peak_rss_mib": rss}


def _hand_jobs():
    peak = [{"framework": "torch", "n": 2048, "gflops_median": 100.0},
            {"framework": "jax", "n": 4096, "gflops_median": 250.0},
            {"framework": "numpy", "n": 2048, "gflops_median": 120.0}]
    return [
        _job("matmul", "peak", 1, peak),
        # jaxpost W-SFT over two rounds: pooled [2, 2, 3, 1, 2, 2] -> median 2 s.
        _job("jaxpost", "sft", 1, [_rec("W-SFT", [2.0, 2.0, 3.0], 1024, flops_per_step=1e11)],
             rss=900.0),
        _job("jaxpost", "sft", 2, [_rec("W-SFT", [1.0, 2.0, 2.0], 1024, flops_per_step=1e11)],
             rss=1100.0),
        _job("torch", "sft", 1, [_rec("W-SFT", [1.0, 1.0], 1024, flops_per_step=1e11)], rss=700.0),
        _job("jaxpost", "grpo", 1, [_rec("W-GRPO", [4.0, 6.0, 5.0], 1024, rollout_median=1.0,
                                         update_median=3.0)]),
        _job("jaxpost", "grpo", 2, [_rec("W-GRPO", [5.0], 1024, rollout_median=3.0,
                                         update_median=2.0)]),
        _job("trl", "grpo", 1, [_rec("W-GRPO", [10.0, 10.0], 1024, variant="GRPOTrainer")]),
        _job("tunix", "sft", 1, [], status="failed"),
    ]


def test_peak_is_the_largest_median_over_frameworks_and_sizes():
    peak = report.matmul_peak(_hand_jobs())
    assert (peak["gflops"], peak["framework"], peak["n"]) == (250.0, "jax", 4096)
    assert peak["per_framework_gflops"] == {"torch": 100.0, "jax": 250.0, "numpy": 120.0}


def _peak_job(rnd, gflops, gbps):
    return _job("matmul", "peak", rnd, [
        {"framework": "numpy", "n": 2048, "gflops_median": gflops},
        {"framework": "jax", "n": 1024, "gflops_median": gflops - 10.0},
        {"framework": "jax", "mib": 256, "gbps_median": gbps}])


@pytest.mark.parametrize("round2, moved", [
    ((250.0, 10.2), "(matmul 25%, largest over smallest probe)"),  # bandwidth: 2%, unsaid
    ((200.0, 11.0), "(memory bandwidth 10%, largest over smallest probe)"),
    ((209.0, 10.4), None),  # 4.5% and 4%: within PEAK_DRIFT (5%)
])
def test_the_peak_per_round_and_whether_the_machine_moved(round2, moved):
    jobs = [_peak_job(1, 200.0, 10.0), _peak_job(2, *round2)] + _hand_jobs()[1:]
    peak = report.matmul_peak(jobs)
    assert peak["per_round_gflops"] == [[1, 200.0], [2, round2[0]]]
    assert peak["per_round_gbps"] == [[1, 10.0], [2, round2[1]]]
    result = _result(jobs)
    line = next(x for x in report.render(result).splitlines() if "matmul peak" in x)
    assert f"per round: 200 / {round2[0]:.0f})" in line
    assert f"(jax; per round: 10.0 / {round2[1]:.1f})" in line
    if moved:
        assert "**The machine's speed moved between rounds** " + moved in line
    else:
        assert "moved" not in line
    # One round: no per-round figures, nothing about moving.
    one = report.render(_result(_hand_jobs()))
    assert "per round" not in one and "moved" not in one


def test_medians_ratios_mfu_and_rss_by_hand():
    jobs = _hand_jobs()
    s = report.summarize(jobs, report.matmul_peak(jobs))
    jp, torch = s["W-SFT"]["jaxpost"], s["W-SFT"]["torch"]
    assert (jp["median_s"], jp["min_s"], jp["max_s"], jp["n"]) == (2.0, 1.0, 3.0, 6)
    assert jp["tokens_per_s"] == 512.0 and torch["tokens_per_s"] == 1024.0
    assert jp["ratio"] == 1.0 and torch["ratio"] == 0.5  # tokens/s: 512 / 1024
    # 1e11 FLOPs in 2 s = 50 GFLOP/s, a fifth of the 250 GFLOP/s peak; torch 100 / 250.
    assert math.isclose(jp["mfu"], 0.2) and math.isclose(torch["mfu"], 0.4)
    assert jp["peak_rss_mib"] == 1100.0  # the larger of its two processes
    g_jp, g_trl = s["W-GRPO"]["jaxpost"], s["W-GRPO"]["trl"]
    assert g_jp["median_s"] == 5.0 and g_jp["ratio"] == 1.0
    assert g_trl["ratio"] == 0.5  # time: 5 s / 10 s
    assert g_jp["rollout_s"] == 2.0 and g_jp["update_s"] == 2.5  # medians over rounds
    assert "tunix" not in s.get("W-SFT", {})  # a failed job has no numbers


def _result(jobs):
    peak = report.matmul_peak(jobs)
    return {"started_utc": "2026-12-01 12:00 UTC", "command": "python -m benchmarks.run",
            "git": "abc", "options": {"rounds": 2, "quick": False,
                                      "peers": ["jaxpost", "jax", "tunix", "torch", "trl"]},
            "machine": {"cpu_model": "cpu", "cores": 2, "loadavg_before": [1, 1, 1],
                        "loadavg_after": [2, 2, 2]},
            "peers": {"jaxpost": {"status": "ok", "versions": {"jax": "0.10.2"}},
                      "jax": {"status": "not_installed", "error": "ImportError: no jax"}},
            "jobs": [dict(j, error="boom") if j["status"] == "failed" else j for j in jobs],
            "peak": peak, "summary": report.summarize(jobs, peak)}


def test_table_rows():
    table = report.render(_result(_hand_jobs()))
    lines = table.splitlines()
    assert "| jaxpost | 2.000 | 1.000–3.000 | 512 | 1.00× | 0.20 | 1100 | 6 | 2.000 / 2.000 |" in lines
    assert "| torch + HF | 1.000 | 1.000–1.000 | 1024 | 0.50× | 0.40 | 700 | 2 | 1.000 |" in lines
    assert any(x.startswith("| TRL (GRPOTrainer) | 10.000 |") and "| 0.50× |" in x
               for x in lines)
    assert "**250 GFLOP/s** (jax, n=4096" in table
    assert "- plain JAX: not installed (ImportError: no jax)" in lines
    assert "- Tunix sft (round 1): failed: boom" in lines


def test_a_variant_record_is_its_own_row_after_its_peer_with_its_memory():
    jobs = _hand_jobs() + [
        _job("jaxpost", "grpo-beta0", 1, [_rec("W-GRPO", [4.0], 1024, row="jaxpost-beta0",
                                               reference="none")], rss=600.0),
        _job("jaxpost", "grpo-lora", 1, [_rec("W-GRPO", [2.5], 1024, row="jaxpost-lora")],
             rss=500.0)]
    s = report.summarize(jobs)
    g = s["W-GRPO"]
    assert set(g) == {"jaxpost", "trl", "jaxpost-beta0", "jaxpost-lora"}
    assert g["jaxpost"]["n"] == 4  # the variants' times stay out of jaxpost's row
    assert g["jaxpost-beta0"]["ratio"] == 1.25 and g["jaxpost-lora"]["ratio"] == 2.0
    assert g["jaxpost-beta0"]["peak_rss_mib"] == 600.0
    table = report.render(_result(jobs))
    grpo_rows = table.split("## W-GRPO")[1].split("\n\n")[1].splitlines()[2:]
    assert [x.split(" | ")[0] for x in grpo_rows] == [
        "| jaxpost", "| jaxpost, β = 0 (no reference)",
        "| jaxpost, LoRA r 8 on q/v (reference: the base, adapters off)",
        "| TRL (GRPOTrainer)"]


def test_default_workloads_add_the_grpo_memory_variants_except_in_quick():
    assert run.parse_args([]).workloads == list(run.WORKLOADS)
    assert run.parse_args(["--quick"]).workloads == ["sft", "gen", "grpo"]
    assert run.schedule(["tunix"], run.WORKLOADS, 1, peak=False) == [
        (1, "tunix", "sft"), (1, "tunix", "gen"), (1, "tunix", "grpo")]


def test_schedule_rotates_peers_per_round_and_starts_with_the_peak():
    jobs = run.schedule(["jaxpost", "jax", "trl"], ["sft", "gen"], 2)
    assert jobs == [(1, "matmul", "peak"), (1, "jaxpost", "sft"), (1, "jaxpost", "gen"),
                    (1, "jax", "sft"), (1, "jax", "gen"), (1, "trl", "sft"),
                    (2, "matmul", "peak"), (2, "jax", "sft"), (2, "jax", "gen"),
                    (2, "trl", "sft"), (2, "jaxpost", "sft"), (2, "jaxpost", "gen")]


def test_xla_flags_take_a_value_that_starts_with_dashes():
    flags = "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0"
    assert run.parse_args(["--xla-flags", flags, "--quick"]).xla_flags == flags
    assert run.parse_args([f"--xla-flags={flags}"]).xla_flags == flags
    assert run.parse_args([]).xla_flags is None
    with pytest.raises(SystemExit):  # a forgotten value does not swallow the next option
        run.parse_args(["--xla-flags", "--quick"])


def test_bad_options_name_the_flag():
    with pytest.raises(SystemExit):
        run.parse_args(["--peers", "jaxpost,nope"])
    assert run.parse_args(["--quick"]).rounds == 1 and run.parse_args([]).rounds == 2


def test_worker_reports_an_import_error_as_not_installed(tmp_path, monkeypatch):
    def fail(name):
        raise ModuleNotFoundError(f"No module named 'tunix' ({name})")
    monkeypatch.setattr(worker.importlib, "import_module", fail)
    out = tmp_path / "w.json"
    assert worker.main(["tunix", "sft", str(out)]) == worker.EXIT_NOT_INSTALLED
    payload = json.loads(out.read_text())
    assert payload["status"] == "not_installed" and "No module named 'tunix'" in payload["error"]


FAKE_PYTHON = """\
#!{python}
# Stands in for a peer's interpreter: argv = -m benchmarks.peers.worker PEER WORKLOAD OUT.
import json, sys
peer, workload, out = sys.argv[3:6]
if peer == "tunix":
    json.dump({{"status": "not_installed", "error": "ImportError: no tunix"}}, open(out, "w"))
    sys.exit(3)
if workload == "sft":
    print("Traceback: the SFT worker crashed"); sys.exit(2)
json.dump({{"status": "ok", "versions": {{"torch": "x"}}, "records": [{{"workload": "W-GEN",
           "all": [0.5, 0.5], "median": 0.5, "tokens_per_iter": 1024}}]}}, open(out, "w"))
"""


def test_missing_and_failing_peers_are_reported_and_the_run_goes_on(tmp_path, capsys):
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    rc = run.main(["--peers", "tunix,torch,jax", "--workloads", "sft,gen", "--rounds", "2",
                   "--no-peak", "--python", str(fake), "--tunix-python", str(fake),
                   "--out", str(out)])
    assert rc == 1  # a worker failed
    result = json.loads((out / "results.json").read_text())
    got = [(j["round"], j["peer"], j["workload"], j["status"]) for j in result["jobs"]]
    # tunix is asked once, then skipped; torch's sft fails in both rounds, its gen runs on.
    assert got == [(1, "tunix", "sft", "not_installed"),
                   (1, "torch", "sft", "failed"), (1, "torch", "gen", "ok"),
                   (1, "jax", "sft", "failed"), (1, "jax", "gen", "ok"),
                   (2, "torch", "sft", "failed"), (2, "torch", "gen", "ok"),
                   (2, "jax", "sft", "failed"), (2, "jax", "gen", "ok")]
    failed = next(j for j in result["jobs"] if j["status"] == "failed")
    assert "exit code 2" in failed["error"] and "the SFT worker crashed" in failed["error"]
    assert result["peers"]["tunix"] == {"status": "not_installed",
                                        "error": "ImportError: no tunix"}
    assert result["summary"]["W-GEN"]["torch"]["tokens_per_s"] == 2048.0
    assert all(j["peak_rss_mib"] > 0 for j in result["jobs"] if j["status"] == "ok")
    table = (out / "table.md").read_text()
    assert "- Tunix: not installed (ImportError: no tunix)" in table
    assert "- torch + HF sft (round 2): failed: exit code 2" in table
    assert "| torch + HF | 0.500 | 0.500–0.500 | 2048 | — |" in table  # no jaxpost, no ratio
    assert "tunix: not installed" in capsys.readouterr().out


def test_sft_flops_match_benchmarks_md():
    assert workloads.param_counts()["total"] == 41_951_744
    assert workloads.param_counts()["matmul"] == 33_554_432
    assert workloads.train_flops_per_token(256) == 213_909_504  # 213.9 MFLOP at seq 256


@pytest.mark.slow
def test_quick_end_to_end_for_jaxpost(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # as .ci/run: 1 device
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--peers",
                           "jaxpost", "--workloads", "sft,gen,grpo,grpo-lora", "--out",
                           str(out)], cwd=ROOT, text=True, env=env, capture_output=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    jp = {w: result["summary"][w]["jaxpost"] for w in ("W-SFT", "W-GEN", "W-GRPO")}
    for w, s in jp.items():
        assert all(math.isfinite(s[k]) and s[k] > 0 for k in ("median_s", "tokens_per_s",
                                                             "peak_rss_mib")), (w, s)
    assert math.isfinite(jp["W-SFT"]["mfu"]) and jp["W-SFT"]["mfu"] > 0
    assert all(math.isfinite(jp["W-GRPO"][f"{k}_s"]) for k in ("rollout", "reference", "update"))
    assert "| jaxpost |" in (out / "table.md").read_text()
    assert os.path.exists(out / "logs")
    # The LoRA memory variant: its own row, its reference the base with adapters off.
    lora = result["summary"]["W-GRPO"]["jaxpost-lora"]
    assert lora["peak_rss_mib"] > 0 and math.isfinite(lora["median_s"])
    (rec,) = [r for j in result["jobs"] if j["workload"] == "grpo-lora" for r in j["records"]]
    assert rec["row"] == "jaxpost-lora" and rec["reference"] == "the base, adapters off"


def test_a_peer_without_its_interpreter_is_not_installed(tmp_path):
    out = tmp_path / "out"
    rc = run.main(["--peers", "tunix", "--no-peak", "--tunix-python",
                   str(tmp_path / "no-venv" / "python"), "--out", str(out)])
    assert rc == 0  # nothing failed: the one peer asked for is absent
    result = json.loads((out / "results.json").read_text())
    assert [j["status"] for j in result["jobs"]] == ["not_installed"]
    assert result["peers"]["tunix"]["status"] == "not_installed"
    assert "no interpreter" in result["peers"]["tunix"]["error"]
    assert "setup_peers.sh" in (out / "table.md").read_text()
