"""Running independent tasks inline, in local processes or as Ray tasks: the packer's stages and verify."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable


def run_tasks(fn: Callable, args: Iterable[tuple], workers: int, use_ray: bool, ray_address: str | None,
              on_done: Callable[[dict], None], in_flight: int = 0) -> list[dict]:  # fmt: skip
    """Run fn(*a) for every a, inline / in `workers` processes / as Ray tasks; results in order.

    `args` is drawn lazily, with at most `in_flight` tasks submitted and unfinished (default: 4 per
    worker; Ray: 4 per CPU of the cluster), so a generator of arguments (a shard's member list) is
    never materialised whole in the driver."""
    it = iter(args)
    results: dict[int, dict] = {}
    if use_ray:
        import ray

        if not ray.is_initialized():
            ray.init(address=ray_address, log_to_driver=False)
        remote = ray.remote(num_cpus=1, max_retries=3, retry_exceptions=[OSError])(fn)
        limit = in_flight or max(4, 4 * int(ray.cluster_resources().get("CPU", 1)))
        pending: dict = {}
        for i, a in itertools.chain(enumerate(it), [(None, None)]):
            while pending and (i is None or len(pending) >= limit):
                done, _ = ray.wait(list(pending), num_returns=1)
                j = pending.pop(done[0])
                results[j] = ray.get(done[0])
                on_done(results[j])
            if i is not None:
                pending[remote.remote(*a)] = i
    elif workers > 1:
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        limit = in_flight or 4 * workers
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures: dict = {}
            for i, a in itertools.chain(enumerate(it), [(None, None)]):
                while futures and (i is None or len(futures) >= limit):
                    done, _ = wait(list(futures), return_when=FIRST_COMPLETED)
                    for fut in done:
                        j = futures.pop(fut)
                        results[j] = fut.result()
                        on_done(results[j])
                if i is not None:
                    futures[pool.submit(fn, *a)] = i
    else:
        for i, a in enumerate(it):
            results[i] = fn(*a)
            on_done(results[i])
    return [results[i] for i in range(len(results))]
