"""Elastic training without a cluster: the sizes a config allows, its one-line errors, and the two
decisions our scaling policy adds to Ray's (pipeline/train/elastic.py), fed with Ray's own status
objects. The runs that lose and gain a host are in tests/test_multinode.py."""

from __future__ import annotations

import pytest
from ray.train import Checkpoint
from ray.train.v2._internal.execution.training_report import _TrainingReport
from ray.train.v2._internal.execution.worker_group import WorkerGroupPollStatus, WorkerGroupState
from ray.train.v2._internal.execution.worker_group.poll import WorkerStatus
from ray.train.v2.api.config import ScalingConfig

from pipeline.config import check_resume_config, resolve
from pipeline.train.elastic import DivisorElasticPolicy, hook_in_place


def test_elastic_world_sizes_are_the_divisors_of_the_step_in_range():
    # V = 1024 / 64 = 16 micro-batches per step
    cfg = resolve("demo", ["schedule.global_batch=1024", "schedule.micro_batch=64", "run.num_workers=8", "run.min_workers=2"])
    assert cfg.elastic and cfg.slots == 16 and cfg.world_sizes() == [2, 4, 8]
    assert [cfg.accum_for(w) for w in (2, 4, 8)] == [8, 4, 2]  # micro x accum x workers = 1024 at every size
    with pytest.raises(ValueError, match=r"cannot train on 3 workers: .* 16 micro-batches per step, .* are 2, 4 or 8$"):
        cfg.accum_for(3)
    fixed = resolve("demo", ["schedule.global_batch=1024", "schedule.micro_batch=64", "run.num_workers=8"])
    assert not fixed.elastic and fixed.world_sizes() == [8]
    with pytest.raises(ValueError, match="cannot train on 4 workers"):
        fixed.accum_for(4)  # a fixed run refuses any other size, as before


def test_elastic_config_errors_name_the_key_and_list_the_sizes():
    with pytest.raises(ValueError, match=r"^run.min_workers=3 does not divide the 16 micro-batches of a step \(global_batch 1024 "
                                         r"/ micro_batch 64\): an elastic run with run.num_workers=8 can use 1, 2, 4 or 8 workers$"):  # fmt: skip
        resolve("demo", ["schedule.global_batch=1024", "schedule.micro_batch=64", "run.num_workers=8", "run.min_workers=3"])
    with pytest.raises(ValueError, match=r"run.min_workers must be in \[0, run.num_workers=2\]"):
        resolve("demo", ["run.min_workers=4"])
    with pytest.raises(ValueError, match="run.resize_check_s must be >= 0"):
        resolve("demo", ["run.resize_check_s=-1"])


def test_elastic_range_may_change_when_a_run_is_resubmitted():
    a = resolve("demo", []).to_dict()
    b = resolve("demo", ["run.min_workers=1", "run.resize_check_s=5", "run.num_workers=1"]).to_dict()
    assert sorted(check_resume_config(a, b, "runs/demo")) == ["run.min_workers", "run.num_workers", "run.resize_check_s"]


def _policy(sizes=(1, 2, 4, 8)):
    return DivisorElasticPolicy(ScalingConfig(num_workers=(1, 8), resources_per_worker={"CPU": 1}), list(sizes))


def test_elastic_policy_rounds_the_placeable_workers_down_to_an_allowed_size():
    p = _policy()
    # Ray counts whole workers per node: 3 + 2 = 5 placeable -> 4; 7 -> 4; 1.5 -> 1; 0 -> 0; 20 -> capped at 8
    for nodes, want in (([3, 2], 4), ([7], 4), ([1.5], 1), ([0.5], 0), ([10, 10], 8)):
        assert p._count_possible_workers({f"n{i}": {"CPU": float(c)} for i, c in enumerate(nodes)}) == want, nodes
    assert _policy([2, 4])._count_possible_workers({"n": {"CPU": 3.0}}) == 2
    assert _policy([2, 4])._count_possible_workers({"n": {"CPU": 1.0}}) == 0  # below min: Ray waits


def _status(reports: dict[int, bool]) -> WorkerGroupPollStatus:
    """One poll: rank -> whether it delivered a checkpoint report (False: a metrics-only report)."""
    ck = Checkpoint("/tmp/nowhere")
    return WorkerGroupPollStatus(worker_statuses={
        r: WorkerStatus(running=True, training_report=_TrainingReport(ck if has else None, {}, False)) for r, has in reports.items()
    })  # fmt: skip


def test_elastic_policy_resizes_a_healthy_group_only_in_the_poll_that_completes_a_checkpoint():
    p = _policy()
    group = WorkerGroupState(start_time=1.0, placement_group_handle=None, workers=[None, None], sync_actor=None)
    none = WorkerGroupPollStatus(worker_statuses={0: WorkerStatus(running=True), 1: WorkerStatus(running=True)})
    seq = [
        (none, False),  # training, no report
        (_status({0: True}), False),  # rank 0 uploaded its shard; rank 1 not yet: not registered
        (none, False),
        (_status({1: True}), True),  # rank 1's report completes checkpoint 1
        (none, False),
        (_status({0: False, 1: False}), False),  # a round of metrics without a checkpoint
        (_status({0: True, 1: True}), True),  # both in one poll: checkpoint 2
        (_status({0: True}), False),  # rank 0 only attaches one (as Ray allows) ...
        (_status({1: False}), True),  # ... the round completes with rank 1's report: registered
    ]
    assert [p.checkpoint_registered(group, s) for s, _ in seq] == [want for _, want in seq]
    # a restarted group (new start time, one worker) counts its own checkpoints from zero
    one = WorkerGroupState(start_time=9.0, placement_group_handle=None, workers=[None], sync_actor=None)
    assert not p.checkpoint_registered(one, WorkerGroupPollStatus(worker_statuses={0: WorkerStatus(running=True)}))
    assert p.checkpoint_registered(one, _status({0: True}))


def test_elastic_trainer_hook_is_what_rays_fit_calls():
    # ElasticTrainer hands its policy to Ray through this private method; a Ray upgrade that drops it
    # must fail here (and ElasticTrainer refuses to start) instead of running Ray's own policy unnoticed.
    assert hook_in_place()


def test_elastic_policy_grows_at_a_registered_checkpoint_but_not_after_the_last_step():
    from ray.train.v2._internal.execution.scaling_policy import NoopDecision, ResizeDecision

    p = DivisorElasticPolicy(ScalingConfig(num_workers=(1, 2), resources_per_worker={"CPU": 1}, elastic_resize_monitor_interval_s=0), [1, 2])
    # Ray's coordinator calls (actors) replaced by their answers: two 1-CPU nodes can hold 2 workers.
    p._maybe_send_resource_request = lambda: None
    p._get_reserved_resources = lambda: {"n0": {"CPU": 1.0}, "n1": {"CPU": 1.0}}
    one = WorkerGroupState(start_time=1.0, placement_group_handle=None, workers=[None], sync_actor=None)
    ck = Checkpoint("/tmp/nowhere")

    def poll(ckpt: bool, final: bool = False):
        report = _TrainingReport(ck if ckpt else None, {"final": final}, False)
        return p.make_decision_for_running_worker_group(one, WorkerGroupPollStatus(worker_statuses={0: WorkerStatus(running=True, training_report=report)}))

    assert isinstance(poll(False), NoopDecision)  # between checkpoints: never restarts the group
    grow = poll(True)
    assert isinstance(grow, ResizeDecision) and grow.num_workers == 2
    assert isinstance(poll(True, final=True), NoopDecision)  # the last step's checkpoint: the run is ending
