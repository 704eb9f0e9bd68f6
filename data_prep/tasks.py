"""Running independent tasks inline, in local processes or as Ray tasks: the packer's stages and verify."""

from __future__ import annotations

from collections.abc import Callable


def run_tasks(fn: Callable, args: list[tuple], workers: int, use_ray: bool, ray_address: str | None,
              on_done: Callable[[dict], None]) -> list[dict]:  # fmt: skip
    """Run fn(*a) for every a, inline / in `workers` processes / as Ray tasks; results in order."""
    results: list[dict | None] = [None] * len(args)
    if use_ray:
        import ray

        if not ray.is_initialized():
            ray.init(address=ray_address, log_to_driver=False)
        remote = ray.remote(num_cpus=1, max_retries=3, retry_exceptions=[OSError])(fn)
        refs = {remote.remote(*a): i for i, a in enumerate(args)}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            i = refs[done[0]]
            results[i] = ray.get(done[0])
            on_done(results[i])
    elif workers > 1:
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(fn, *a): i for i, a in enumerate(args)}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                on_done(results[futures[fut]])
    else:
        for i, a in enumerate(args):
            results[i] = fn(*a)
            on_done(results[i])
    return results  # type: ignore[return-value]
