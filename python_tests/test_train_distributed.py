"""Training and evaluation under torchrun (gloo, CPU): runs that always exit,
a lost or hung rank that ends the job with a clear error, --auto-resume after
a restart, two nodes, and sharded evaluation equal to one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gmvq_ext import train
from helpers import free_port
from training_runs import SMALL, finish, start, torchrun, wait_for

# Within this many seconds of results.json a finished process has exited (it took 1-3 s; a
# teardown deadlock used to hold it forever).
EXIT_AFTER_RESULTS_SECONDS = 60
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def reap_leftover_processes(tmp_path):
    """After each test, kill every process still working in its folder: a failed
    test must not leave ranks behind that would join (and break) later runs.
    torchrun starts each worker in a session of its own, so killing the
    launcher's process group would miss them; their command line names tmp_path."""
    yield
    marker = str(tmp_path).encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                continue


def descendant_with_rank(root_pid: int, rank: int) -> int:
    """The PID of the worker process (a descendant of root_pid) whose environment has RANK=rank."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        parents = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
        for pid in parents:
            ancestor = parents.get(pid)
            while ancestor not in (None, 0, 1, root_pid):
                ancestor = parents.get(ancestor)
            if ancestor != root_pid:
                continue
            try:
                environment = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environment and b"LOCAL_RANK" in b"".join(environment):
                return pid
        time.sleep(0.1)
    pytest.fail(f"no worker with RANK={rank} under process {root_pid}")


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def assert_same_run(a: dict, b: dict) -> None:
    for key in ("test_mse", "test_psnr", "test_ssim", "test_perplexity", "test_perplexity_hard", "codes_used",
                "steps", "rank_parameter_checksums"):
        assert a[key] == b[key], key


def test_torchrun_runs_exit_promptly_with_identical_weights_and_no_warning(tmp_path):
    """The teardown deadlock hung about one run in three: several runs in a row must each exit."""
    for attempt in range(3):
        out = tmp_path / f"ddp{attempt}"
        process = start(torchrun("--standalone", "--nproc_per_node", "2", "-m", "gmvq_ext.train", *SMALL,
                                 "--seed", str(attempt), "--epochs", "1", "--out", str(out)))
        wait_for(out / "results.json", process)
        written = time.monotonic()
        code, _, err = finish(process, EXIT_AFTER_RESULTS_SECONDS)
        assert code == 0, err[-3000:]
        assert time.monotonic() - written < EXIT_AFTER_RESULTS_SECONDS
        assert "Warning" not in err, err[-3000:]  # no deprecated collective, no DDP stride warning
        summary = results(out)
        assert summary["world_size"] == 2 and summary["steps"] == 3 and summary["test_images"] == 64
        checksums = summary["rank_parameter_checksums"]
        assert len(checksums) == 2 and checksums[0] == checksums[1]


def two_standalone_ranks(out: Path, *extra: str) -> tuple[subprocess.Popen, subprocess.Popen]:
    """Two ranks started by hand (no torchrun agent that would clean up after a lost one)."""
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    command = [sys.executable, "-m", "gmvq_ext.train", *SMALL, "--epochs", "40", "--out", str(out), *extra]
    return (start(command, RANK="0", LOCAL_RANK="0", **env), start(command, RANK="1", LOCAL_RANK="1", **env))


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_lost_rank_ends_the_others_with_a_clear_error(tmp_path, how):
    out = tmp_path / "lost"
    rank0, rank1 = two_standalone_ranks(out, "--dist-timeout", "10")
    try:
        wait_for(out / "checkpoint.pt", rank0)  # mid-run: epoch 1 done, 39 to go
        os.kill(rank1.pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        lost = time.monotonic()
        code, _, err = finish(rank0, 90)
        assert time.monotonic() - lost < 90
        assert code != 0
        assert "gmvq-train: error: rank 0: a collective with the other processes failed" in err, err[-3000:]
        assert "Traceback" not in err
    finally:
        os.killpg(rank1.pid, signal.SIGKILL)
        rank1.communicate()


def test_auto_resume_after_a_killed_rank_matches_the_uninterrupted_run(tmp_path):
    straight, restarted = tmp_path / "straight", tmp_path / "restarted"
    common = ["--standalone", "--nproc_per_node", "2", "-m", "gmvq_ext.train", *SMALL, "--epochs", "3",
              "--auto-resume"]
    code, _, err = finish(start(torchrun(*common, "--out", str(straight))), 600)
    assert code == 0, err[-3000:]

    launcher = start(torchrun("--max-restarts", "1", *common, "--out", str(restarted)))
    wait_for(restarted / "checkpoint.pt", launcher)
    os.kill(descendant_with_rank(launcher.pid, 1), signal.SIGKILL)
    code, out, err = finish(launcher, 600)
    assert code == 0, err[-3000:]
    assert "resumed from epoch" in out  # the restarted workers continued the checkpoint
    assert_same_run(results(straight), results(restarted))
    lines = [json.loads(line) for line in (restarted / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in lines] == [1, 2, 3]


def test_auto_resume_starts_continues_and_finishes_in_one_process(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.main([*SMALL, "--epochs", "2", "--out", str(straight)])
    assert train.main([*SMALL, "--epochs", "2", "--auto-resume", "--stop-after-epoch", "1",
                       "--out", str(split)]) is None  # no checkpoint yet: starts fresh
    train.main([*SMALL, "--epochs", "2", "--auto-resume", "--out", str(split)])  # continues from epoch 1
    assert_same_run(results(straight), results(split))
    (split / "results.json").unlink()  # as if the job died after its last checkpoint
    again = train.main([*SMALL, "--epochs", "2", "--auto-resume", "--out", str(split)])
    assert_same_run(results(straight), again)
    with pytest.raises(SystemExit, match="already >= --epochs"):
        train.main([*SMALL, "--epochs", "2", "--resume", "--out", str(split)])


def test_two_nodes_with_c10d_rendezvous(tmp_path):
    out = tmp_path / "nodes"
    endpoint = f"127.0.0.1:{free_port()}"
    agents = [start(torchrun("--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
                             "--rdzv-endpoint", endpoint, "--rdzv-id", "gmvq-test", "-m", "gmvq_ext.train",
                             *SMALL, "--epochs", "1", "--out", str(out)))
              for _ in range(2)]
    for agent in agents:
        code, _, err = finish(agent, 600)
        assert code == 0, err[-3000:]
    summary = results(out)
    assert summary["world_size"] == 2
    assert summary["rank_parameter_checksums"][0] == summary["rank_parameter_checksums"][1]


def test_sharded_evaluation_equals_one_process(tmp_path):
    out = tmp_path / "run"
    train.main([*SMALL, "--epochs", "1", "--out", str(out)])
    checkpoint = str(out / "checkpoint.pt")
    # 64 test images in batches of 24: 3 batches, 2 on rank 0 and 1 on rank 1.
    single = tmp_path / "single.json"
    code, _, err = finish(start([sys.executable, "-m", "gmvq_ext.cli.evaluate", "--checkpoint", checkpoint,
                                 "--batch-size", "24", "--device", "cpu", "--out", str(single)]), 300)
    assert code == 0, err[-3000:]
    sharded = tmp_path / "sharded.json"
    code, _, err = finish(start(torchrun("--standalone", "--nproc_per_node", "2", "-m", "gmvq_ext.cli.evaluate",
                                         "--checkpoint", checkpoint, "--batch-size", "24", "--device", "cpu",
                                         "--out", str(sharded))), 300)
    assert code == 0, err[-3000:]
    a, b = json.loads(single.read_text()), json.loads(sharded.read_text())
    for key in ("test_mse", "test_psnr", "test_ssim", "test_perplexity", "test_perplexity_hard",
                "test_perplexity_hard_global", "codes_used", "test_images"):
        assert a[key] == b[key], key
