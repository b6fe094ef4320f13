"""What a run promises to repeat, what it records to say so, and its quiet kernels.

Promise (README, "Reproducibility"): the same parameters (seeds included), torch thread count,
device, CPU instruction set and package versions give identical weights and an identical
``summary.json`` apart from wall-clock seconds. Another thread count changes the order of
floating-point sums: single evaluations agree to float32 rounding (tested here), trained
networks are not promised to agree (training amplifies rounding differences).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from jupyter_client.manager import KernelManager

from cryosphere import cli
from cryosphere.poses.labels import landscape
from cryosphere.poses.labels import templates as labels_templates
from cryosphere.poses.network.model import ModelConfig, PoseDistributionNetwork
from cryosphere.runs import checks, execution, reproducibility

THREAD_PROBE = (
    "import os, torch\n"
    "from cryosphere.runs import execution\n"
    "execution.record_results(run_dir, '02_second', {'torch_threads': torch.get_num_threads(),"
    " 'omp': os.environ.get('OMP_NUM_THREADS'), 'epochs': epochs})"
)
WAIT_FOR_RELEASE = (
    "import time\n"
    "from pathlib import Path\n"
    "from cryosphere.runs import execution\n"
    "start = time.time()\n"
    "while not (Path(run_dir).parent / 'release').exists():\n"
    "    assert time.time() - start < 120, 'never released'\n"
    "    time.sleep(0.05)\n"
    "execution.record_results(run_dir, '02_second', {'epochs': epochs})"
)


def test_run_prints_no_kernel_transport_warning(tmp_path, capfd, monkeypatch, write_tiny_series):
    notebooks = write_tiny_series(tmp_path / "nb", "print('second step ran')")
    plan = execution.plan_run("quick", runs_root=tmp_path / "runs", notebooks_dir=notebooks)
    execution.execute_run(plan, progress=False)
    out, err = capfd.readouterr()  # file-descriptor level: the kernels' own stderr included
    assert "[2/2] 02_second" in out
    assert "without encryption" not in out + err and "WARNING" not in err
    # control: a plain TCP kernel manager prints it, so the capture above would have seen it
    monkeypatch.setattr(execution, "kernel_manager_class", lambda: KernelManager)
    execution.execute_run(plan, overwrite=True, progress=False, log=lambda _: None)
    assert "Kernel is running over TCP without encryption" in "".join(capfd.readouterr())


def test_a_failing_step_still_reports_its_error(tmp_path, capfd, write_tiny_series):
    notebooks = write_tiny_series(tmp_path / "nb", "raise RuntimeError('real problem here')")
    plan = execution.plan_run("quick", runs_root=tmp_path / "runs", notebooks_dir=notebooks)
    with pytest.raises(execution.RunStepError, match="RuntimeError: real problem here"):
        execution.execute_run(plan, progress=False, log=lambda _: None)
    assert not (plan.run_dir / checks.LOCK_FILE).exists()


def test_summary_records_what_decides_reproducibility(tmp_path, write_tiny_series):
    notebooks = write_tiny_series(tmp_path / "nb", THREAD_PROBE)
    plan = execution.plan_run("quick", runs_root=tmp_path / "runs", notebooks_dir=notebooks)
    environment = {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    summary = execution.execute_run(plan, progress=False, log=lambda _: None, threads=1)
    assert {name: os.environ.get(name) for name in environment} == environment  # restored
    record = summary["reproducibility"]
    assert record["threads"] == 1
    # the kernels really ran with that thread count
    assert summary["results"]["02_second"] == {"torch_threads": 1, "omp": "1", "epochs": 200}
    assert record["packages"]["torch"] == torch.__version__
    assert record["packages"]["numpy"] == np.__version__
    assert {"cryosphere", "e3nn", "scipy", "gemmi"} <= set(record["packages"])
    assert record["seeds"] == {"seed": 0}  # the notebook default, as the notebooks got it
    assert record["device"] == ("cpu" if not torch.cuda.is_available() else record["device"])
    assert record["blas"]["torch_mkl"] == torch.backends.mkl.is_available()
    assert record["python"] == sys.version.split()[0]
    stored = json.loads((plan.run_dir / "summary.json").read_text())
    assert stored["reproducibility"] == record


def test_same_threads_give_identical_comparable_summaries(tmp_path, write_tiny_series):
    notebooks = write_tiny_series(tmp_path / "nb", THREAD_PROBE)
    summaries = []
    for name in ("a", "b"):
        plan = execution.plan_run("quick", runs_root=tmp_path, name=name, notebooks_dir=notebooks)
        summaries.append(execution.execute_run(plan, progress=False, log=lambda _: None, threads=2))
    assert summaries[0] != summaries[1]  # paths and seconds differ…
    a, b = (reproducibility.comparable_summary(s) for s in summaries)
    assert a == b  # …and nothing else
    assert "timings_s" not in a and a["parameters"]["run_dir"] == "<run_dir>"


def test_other_thread_counts_agree_within_float32_rounding(small_dataset):
    """One evaluation with 1 and 2 threads: BLAS/convolution sums in another order.

    MSE: within ``2·eps·‖a−c‖·‖b−c‖`` (see test_labels). Network logits: each layer's float32
    reductions over K terms differ by at most ~K·eps relative to the sum of |terms|; with five
    layers of K ≤ ~2,000 that is ≤ ~1e-3 of max |logit| in the worst case, ~1e-6 typically: the
    test uses 1e-4. The same thread count repeats bit for bit.
    """
    images = small_dataset.noisy_images[:8]
    templates = labels_templates.template_bank(small_dataset.volume, 1, 1.0)
    model = PoseDistributionNetwork(ModelConfig(image_size=32, lmax=2, grid_level=1), seed=0)
    model.eval()
    before = torch.get_num_threads()
    outputs = {}
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            with torch.no_grad():
                logits = model(torch.from_numpy(images)).numpy()
            outputs.setdefault(threads, []).append(
                (landscape.mse_landscape(images, templates), logits)
            )
    finally:
        torch.set_num_threads(before)
    (mse_1, logits_1), (mse_1b, logits_1b) = outputs[1]
    mse_2, logits_2 = outputs[2][0]
    np.testing.assert_array_equal(mse_1, mse_1b)
    np.testing.assert_array_equal(logits_1, logits_1b)
    eps = float(np.finfo(np.float32).eps)
    flat = templates.reshape(len(templates), -1).astype(np.float64)
    centre = flat.mean(axis=0)
    norms = np.outer(
        np.linalg.norm(images.reshape(len(images), -1) - centre, axis=1),
        np.linalg.norm(flat - centre, axis=1),
    )
    assert np.all(np.abs(mse_1 - mse_2) <= 2 * eps * norms + eps * np.abs(mse_1))
    np.testing.assert_allclose(logits_1, logits_2, rtol=0, atol=1e-4 * np.abs(logits_1).max())


def _wait_for(condition, seconds=120.0):
    start = time.time()
    while not condition():
        assert time.time() - start < seconds, "timed out"
        time.sleep(0.1)


def _steps(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "steps.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def test_killed_run_resumes_to_the_summary_of_an_uninterrupted_run(tmp_path, write_tiny_series):
    notebooks = write_tiny_series(tmp_path / "nb", WAIT_FOR_RELEASE)
    root = tmp_path / "runs"
    argv = ["run", "--runs-root", str(root), "--notebooks", str(notebooks), "--no-progress"]
    argv += ["--threads", "1"]
    process = subprocess.Popen(
        [sys.executable, "-m", "cryosphere.cli", *argv, "--name", "killed"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    killed = root / "killed"
    try:  # kill it (and its kernel) while step 02 runs
        _wait_for(
            lambda: "01_first" in _steps(killed) and (killed / "notebooks/02_second.ipynb").exists()
        )
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert set(_steps(killed)) == {"01_first"} and not (killed / "summary.json").exists()
    assert (killed / checks.LOCK_FILE).exists()  # left by the killed run: stale, taken over
    debris = killed / "results" / ".02_second.k1ll3d.tmp.json"  # as a write cut short leaves
    debris.parent.mkdir(exist_ok=True)
    debris.write_text('{"half')
    (root / "release").write_text("")
    assert cli.main([*argv, "--name", "killed"]) == 0
    assert cli.main([*argv, "--name", "straight"]) == 0
    resumed, straight = (
        reproducibility.comparable_summary(json.loads((root / n / "summary.json").read_text()))
        for n in ("killed", "straight")
    )
    assert resumed == straight
    assert resumed["results"]["02_second"] == {"epochs": execution.PROFILES["quick"]["epochs"]}
    assert not (killed / checks.LOCK_FILE).exists() and not debris.exists()
