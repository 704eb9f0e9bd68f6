"""Elastic worker groups with the same math at every size (docs/multi-node.md).

Ray Train 2.60 resizes a worker group between (min_workers, max_workers) with its ElasticScalingPolicy:
on a failure it restarts at as many workers as the cluster can place, and while healthy it checks
every elastic_resize_monitor_interval_s whether more could be placed, then restarts the group at that
size; the workers resume from the latest registered checkpoint. Two things in that policy do not fit
a run whose global batch is V micro-batches (V = global_batch / micro_batch):

1. It picks any count in the range. At 3 workers and V = 4 the accumulation would be 4/3; we round the
   count down to a size that divides V (TrainConfig.world_sizes), so a step always sums the same V
   micro-batches, whichever worker owns them.
2. A healthy resize restarts the group wherever training is, discarding the steps since the last
   checkpoint. We resize a healthy group only in the controller poll that registered a checkpoint
   (and never after the last one): the restart resumes from it and discards the steps trained while
   that checkpoint uploaded, plus at most one poll interval (2 s).

Both are small overrides of Ray's class rather than a policy of our own: resource requests, the
autoscaling coordinator, the monitor interval and the failure path stay Ray's. Ray builds the policy
inside TorchTrainer.fit; `ElasticTrainer` hands it ours (a private hook: Ray is pinned, and the
elastic tests in tests/test_multinode.py fail if that hook changes).
"""

from __future__ import annotations

import logging
from collections import deque

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy, NoopDecision

log = logging.getLogger("nfnet.elastic")


class DivisorElasticPolicy(ElasticScalingPolicy):
    """Ray's elastic policy restricted to `sizes` (ascending) and to checkpoint boundaries."""

    def __init__(self, scaling_config, sizes: list[int]):
        super().__init__(scaling_config)
        self.sizes = sorted(sizes)
        self._group_start = None  # WorkerGroupState.start_time of the group the queues below belong to
        self._queues: list[deque] = []  # per world rank: its reports not yet in a complete round

    def _count_possible_workers(self, reserved_resources) -> int:
        """The largest allowed size that fits what Ray says can be placed (0 when none fits)."""
        n = super()._count_possible_workers(reserved_resources)
        return max((s for s in self.sizes if s <= n), default=0)

    def completed_round(self, worker_group_state, worker_group_status) -> list | None:
        """The reports (one per rank) of the round this poll completed, else None. The same rounds as
        Ray's ReportCallbackHandler, which runs earlier in this poll: each rank's reports queue up in
        order, a round is complete when every rank has one, one round per poll; Ray registers the
        round's checkpoint (if any rank attached one) before the scaling decision."""
        n = worker_group_state.num_workers
        if worker_group_state.start_time != self._group_start:  # a new group: Ray's handler starts over too
            self._group_start, self._queues = worker_group_state.start_time, [deque() for _ in range(n)]
        for rank, status in worker_group_status.worker_statuses.items():
            if status.training_report is not None and rank < n:
                self._queues[rank].append(status.training_report)
        if not all(self._queues):
            return None
        return [q.popleft() for q in self._queues]

    def checkpoint_registered(self, worker_group_state, worker_group_status) -> bool:
        """Whether this poll registered a checkpoint that is not the run's last (metrics["final"])."""
        round_ = self.completed_round(worker_group_state, worker_group_status)
        if not round_ or not any(r.checkpoint is not None for r in round_):
            return False
        return not round_[0].metrics.get("final")  # after the last step a restart would only redo the end

    def make_decision_for_running_worker_group(self, worker_group_state, worker_group_status):
        if not self.checkpoint_registered(worker_group_state, worker_group_status):
            self._maybe_send_resource_request()  # what Ray's policy does on every poll
            return NoopDecision()
        return super().make_decision_for_running_worker_group(worker_group_state, worker_group_status)


def hook_in_place() -> bool:
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    return "_initialize_and_run_controller" in DataParallelTrainer.fit.__code__.co_names


class ElasticTrainer(TorchTrainer):
    """TorchTrainer whose controller gets DivisorElasticPolicy(sizes)."""

    def __init__(self, *args, world_sizes: list[int], **kwargs):
        # The hook must still be what fit() calls, else Ray's own policy would run unnoticed.
        if not hook_in_place():
            raise RuntimeError("this Ray version's TrainDataParallelTrainer.fit no longer calls _initialize_and_run_controller: "
                               "pipeline/train/elastic.py cannot install its scaling policy")  # fmt: skip
        super().__init__(*args, **kwargs)
        self._world_sizes = world_sizes

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["scaling_policy"] = DivisorElasticPolicy(self.scaling_config, self._world_sizes)
        return super()._initialize_and_run_controller(**controller_init_kwargs)
