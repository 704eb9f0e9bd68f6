"""Watch the collectives our own code issues: each tensor must sit on the engine's device and must not
come from a tensor factory called without a device (torch.tensor([...]) lands on the CPU, which NCCL
cannot reduce: the first GPU step would raise). On a CPU-only machine the device test alone could
not fail, so the factory provenance is what the CPU run checks; on a GPU both are checked.

Used inside Ray Train workers (the test registers this module with Ray's cloudpickle by value).
"""

from __future__ import annotations

import inspect
import json
import os

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

COLLECTIVES = ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor")  # fmt: skip
FACTORIES = {"tensor", "as_tensor", "scalar_tensor", "zeros", "ones", "full", "empty", "arange", "rand", "randn"}


class _Provenance(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if getattr(func, "__name__", "") in FACTORIES and kwargs.get("device") is None and isinstance(out, torch.Tensor):
            out._built_without_device = True
        return out


class CollectiveWatch:
    """with CollectiveWatch(device, prefix="pipeline.") as w: ...; then w.checked (list) and w.bad (list)."""

    def __init__(self, device: torch.device, prefix: str = "pipeline."):
        self.device, self.prefix = torch.device(device), prefix
        self.checked, self.bad, self._saved = [], [], {}

    def _wrap(self, name: str):
        real = getattr(dist, name)

        def checked(*args, **kwargs):  # DeepSpeed passes its tensors by keyword
            frame = inspect.currentframe().f_back
            caller = frame.f_globals.get("__name__", "")
            if caller.startswith(self.prefix):
                where = f"{caller}:{frame.f_lineno} {name}"
                flat = [t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, (list, tuple)) else [a])]
                for t in (t for t in flat if isinstance(t, torch.Tensor)):
                    if t.device != self.device or getattr(t, "_built_without_device", False):
                        self.bad.append(f"{where}: {t.dtype} on {t.device}"
                                        f"{', built without a device' if getattr(t, '_built_without_device', False) else ''}")  # fmt: skip
                    else:
                        self.checked.append(where)
            return real(*args, **kwargs)

        return real, checked

    def __enter__(self):
        for name in COLLECTIVES:
            self._saved[name], wrapped = self._wrap(name)
            setattr(dist, name, wrapped)
        self._mode = _Provenance()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for name, real in self._saved.items():
            setattr(dist, name, real)
        return False


def watched_loop(out_dir: str):
    """A Ray Train worker function: the real training loop under a CollectiveWatch; each rank writes
    what it saw to out_dir/collectives-<rank>.json."""

    def loop(config: dict) -> None:
        import ray.train

        from pipeline.train.run import train_loop_per_worker

        ctx = ray.train.get_context()
        gpu = config["train"]["run"]["use_gpu"] and torch.cuda.is_available()
        device = torch.device("cuda", ctx.get_local_rank()) if gpu else torch.device("cpu")
        with CollectiveWatch(device) as w:
            train_loop_per_worker(config)
        with open(os.path.join(out_dir, f"collectives-{ctx.get_world_rank()}.json"), "w") as f:
            json.dump({"checked": w.checked, "bad": w.bad}, f)

    return loop
