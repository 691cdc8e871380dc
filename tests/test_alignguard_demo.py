"""scripts/alignguard_demo.py end to end on a tiny model: table, JSON and chart come out."""

import importlib.util
import json
import os

import pytest

from jaxpost.data import alignment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {"model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 1,
        "model.num_heads": 2, "model.num_kv_heads": 1, "model.head_dim": 16,
        "steps": 2, "log_every": 1, "checkpoint_every": 0, "eval_every": 0,
        "eval_at_start": False, "data.batch_size": 4, "data.num_records": 32,
        "data.eval_batches": 0, "optimizer.warmup_steps": 0, "mesh.num_devices": 1}


def load_script():
    spec = importlib.util.spec_from_file_location(
        "alignguard_demo_script", os.path.join(ROOT, "scripts", "alignguard_demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_demo_pipeline_writes_table_json_and_chart(tmp_path, capsys):
    import matplotlib.pyplot as plt

    demo = load_script()
    arms = ("full", "lora")
    report = demo.run_demo(str(tmp_path), arms, overrides=TINY, prompts_per_category=1,
                           task_prompts=4, max_new_tokens=4)
    assert list(report["arms"]) == list(arms)
    stored = json.loads((tmp_path / "drift.json").read_text())
    for arm in arms:
        r = stored["arms"][arm]
        assert set(r["comparison"]["categories"]) == set(alignment.CATEGORIES)
        assert 0.0 <= r["task_accuracy"] <= 1.0
        assert len(r["samples"]) == len(alignment.CATEGORIES)
        assert r["comparison"]["before"] == stored["warmup"]["drift"]
        assert os.path.exists(tmp_path / arm / "drift.json")
        with open(tmp_path / arm / "metrics.jsonl") as f:
            assert [json.loads(x)["step"] for x in f] == [1, 2]
    table = (tmp_path / "drift.md").read_text()
    assert "| aligned warm-up (before) |" in table and "| LoRA |" in table
    assert "| weapons (unsafe) | refusal_rate |" in table
    assert "safe answered as trained" in table.splitlines()[0]
    assert table.splitlines()[0] in capsys.readouterr().out
    image = plt.imread(tmp_path / "drift.png")
    assert image.shape[:2] == (400, 800)
    # A second run reuses every finished stage (nothing trains again).
    again = demo.run_demo(str(tmp_path), ("lora",), overrides=TINY, prompts_per_category=1,
                          task_prompts=4, max_new_tokens=4)
    assert again["arms"]["lora"]["task_accuracy"] == report["arms"]["lora"]["task_accuracy"]
    assert again["arms"]["lora"]["reused"] and again["warmup"]["reused"]
    assert again["arms"]["lora"]["train_cpu_s"] == report["arms"]["lora"]["train_cpu_s"]
