"""``scale: ray`` (fastmerge.ray_scale): Ray actors give the serial trial log for a seed (PS, and
PS then DFS through a real evaluator), a worker that dies is restarted and its genome scored again,
a killed Ray run resumes to the uninterrupted log (its driver joined through ``ray_address``), a run
without one starts and stops its own local cluster, and config errors and a missing Ray are one
line. Skipped when Ray is not installed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray")

from fastmerge.errors import FastmergeError  # noqa: E402
from fastmerge.evolve import EvolveConfig, evolve, read_trials  # noqa: E402
from fastmerge.merger import Merger  # noqa: E402

from .test_evolve import ROOT, _wait_for, config, make_target, real_config, world  # noqa: E402, F401

#: the subprocesses' environment: this checkout importable, one torch thread (2 shared cores)
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def cluster():
    """One local 2-CPU Ray cluster for the file (started as a run without ray_address starts one);
    in-process runs use it, subprocesses join it by its address."""
    from fastmerge.ray_scale import init_local

    init_local(num_cpus=2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def serial(families, tmp_path_factory):
    """The reference: a 3-generation PS search scored in this process, and its trial log."""
    root = tmp_path_factory.mktemp("ray-serial")
    cfg = config(families("llama", layers=4), root / "one", ps={"group_size": 2}, budget={"generations": 3},
                 cma={"popsize": 4, "seed": 5})
    cfg["evaluator"]["target"] = str(make_target(cfg, np.full(4, 0.4), root / "target.safetensors"))
    result = evolve(cfg)
    return cfg, read_trials(root / "one/ps/trials.jsonl", timings=False), result


def test_ray_workers_give_the_serial_log(cluster, serial, tmp_path):
    cfg, want, one = serial
    two = evolve({**cfg, "out": str(tmp_path / "two"), "scale": "ray", "workers": 2})
    assert read_trials(tmp_path / "two/ps/trials.jsonl", timings=False) == want  # x, fitness, metrics
    assert two.best.best_x == one.best.best_x and two.best.best_fitness == one.best.best_fitness
    assert yaml.safe_load((tmp_path / "two/config.yml").read_text())["scale"] == "ray"
    assert ray.is_initialized() and ray.cluster_resources()["CPU"] == 2  # the caller's session stays open


def test_ps_then_dfs_on_ray_gives_the_serial_logs(cluster, world, tmp_path):  # noqa: F811
    """Both stages (the DFS one's actors load the PS merge and run path models) with a real evaluator."""
    cfg = real_config(world, tmp_path / "one", "ps+dfs", merge_method="ties",
                      evaluator={"name": "loglik", "data": str(world["text"])}, metric="loglik")
    evolve(cfg)
    evolve({**cfg, "out": str(tmp_path / "two"), "scale": "ray", "workers": 2})
    for stage in ("ps", "dfs"):
        assert read_trials(tmp_path / f"two/{stage}/trials.jsonl", timings=False) == \
            read_trials(tmp_path / f"one/{stage}/trials.jsonl", timings=False), stage


def test_a_dead_worker_is_restarted_and_its_genome_scored_again(cluster, serial, tmp_path):
    cfg, want, _ = serial
    marker = tmp_path / "crashed"
    ev = {**cfg["evaluator"], "crash_once": str(marker), "crash_on_call": 2}  # a worker dies in generation 0
    evolve({**cfg, "out": str(tmp_path / "out"), "scale": "ray", "workers": 2, "evaluator": ev})
    assert marker.exists()
    assert read_trials(tmp_path / "out/ps/trials.jsonl", timings=False) == want


def test_a_killed_ray_run_resumes_to_the_uninterrupted_log(cluster, serial, tmp_path):
    """The driver (a `fastmerge evolve` process that joined the cluster by ray_address) is killed
    in generation 1; --resume (here in this process's Ray session) finishes the same log."""
    cfg, want, one = serial
    run = {**cfg, "out": str(tmp_path / "killed"), "scale": "ray", "workers": 2, "ray_address": cluster,
           "evaluator": {**cfg["evaluator"], "sleep": 0.3}}
    file = tmp_path / "killed.yml"
    file.write_text(yaml.safe_dump(run))
    log = tmp_path / "killed/ps/trials.jsonl"

    def in_generation_1() -> bool:
        return log.exists() and any(json.loads(ln)["generation"] == 1 for ln in log.read_text().splitlines() if ln)

    env = {**ENV, "RAY_AUTH_MODE": "token"}  # the local cluster uses Ray's token authentication (~/.ray/auth_token)
    proc = subprocess.Popen([sys.executable, "-m", "fastmerge", "evolve", str(file), "--no-progress"], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(in_generation_1, 300, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 4 < len(read_trials(log)) < 8  # generation 0 complete, generation 1 cut off

    resumed = evolve(file, resume=True)
    assert read_trials(log, timings=False) == want
    assert resumed.best.best_x == one.best.best_x and resumed.best.trials == 12
    assert ray.cluster_resources()["CPU"] == 2  # the joined cluster outlived its killed driver


def test_a_run_without_ray_address_starts_and_stops_its_own_cluster(serial, tmp_path):
    """In a fresh process (no Ray session open): a local cluster for the stage, shut down after it;
    the single-machine switch that keeps it on 127.0.0.1 is off again afterwards."""
    cfg, want, _ = serial
    run = {**cfg, "out": str(tmp_path / "own"), "scale": "ray", "workers": 1, "budget": {"generations": 1}}
    script = textwrap.dedent(f"""
        import json, os, ray
        from fastmerge.evolve import evolve
        evolve(json.loads({json.dumps(json.dumps(run))}))
        from ray._private import ray_constants
        assert not ray.is_initialized(), "the cluster we started is still up"
        assert ray_constants.ENABLE_RAY_CLUSTER and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
    assert read_trials(tmp_path / "own/ps/trials.jsonl", timings=False) == want[:4]


def test_a_worker_error_is_one_line(cluster, serial, tmp_path):
    cfg, _, _ = serial
    with pytest.raises(FastmergeError, match=r"^metric 'nope' is not among the evaluator's metrics") as e:
        evolve({**cfg, "out": str(tmp_path / "out"), "scale": "ray", "metric": "nope"})
    assert "\n" not in str(e.value)


BAD = [
    ({"ray_address": "auto"}, "ray_address: joining a Ray cluster needs scale: ray"),
    ({"scale": "ray", "ray_address": " "}, "ray_address: empty"),
    ({"scale": "slurm"}, "scale: Input should be 'local' or 'ray'"),
    ({"scale": "ray", "device": "cuda:1"}, "use device: cuda, not cuda:1"),
    ({"scale": "ray", "workers": 0}, "workers: must be >= 1"),
]


@pytest.mark.parametrize("over,msg", BAD, ids=[m for _, m in BAD])
def test_config_errors_are_one_line(families, tmp_path, monkeypatch, over, msg):
    cfg = config(families("llama", layers=4), tmp_path / "out", **over)

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(Merger, "__init__", no_loading)
    with pytest.raises(FastmergeError, match=msg) as e:
        evolve(cfg)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_where_and_how_candidates_are_scored_is_not_part_of_the_search(families, tmp_path):
    """scale, ray_address and workers (like device) may change on --resume: not in the fingerprint."""
    cfg = config(families("llama", layers=4), tmp_path / "out")
    base = EvolveConfig.from_yaml(cfg).fingerprint("ps")
    for over in ({"scale": "ray"}, {"scale": "ray", "ray_address": "10.0.0.1:6379", "workers": 8}):
        assert EvolveConfig.from_yaml({**cfg, **over}).fingerprint("ps") == base
    assert EvolveConfig.from_yaml({**cfg, "cma": {"seed": 4}}).fingerprint("ps") != base


def test_a_missing_ray_is_one_line_naming_the_extra(families, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets when Ray is not installed
    cfg = config(families("llama", layers=4), tmp_path / "out", scale="ray", workers=2)
    with pytest.raises(FastmergeError, match=r"scale: ray needs ray, which is not installed: "
                                             r"pip install 'fastmerge\[ray\]'$") as e:
        evolve(cfg)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_the_library_does_not_import_ray():
    code = "import fastmerge, fastmerge.evolve, fastmerge.evolve_config, sys; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, check=True, timeout=120)
