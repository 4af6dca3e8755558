"""A CPU stand-in for CUDA-graph capture, so that the engine's graphed decode path runs in the tests.

`RecordedGraphs.capture(fn)` runs `fn` once under a TorchDispatchMode that records every tensor op
(with every host sync forbidden, as a CUDA capture forbids them) and returns a `replay()` that redoes
exactly those ops and nothing else, like a CUDA graph:

* a tensor an op made during the recording is made again by the replay (the graph's private memory);
* any other tensor an op read (weights, KV cache, the persistent input and output buffers) is the very
  same tensor object, read or written in place at replay time (the memory a graph's kernels point at);
* Python decisions taken while recording (shapes, branches, per-step objects) are frozen, and `replay`
  takes no arguments: a step that handed the forward a new tensor or a new length per call, instead of
  writing into the persistent buffers, would replay stale inputs, and its outputs would differ from eager;
* an op whose output shape differs on replay (a data-dependent shape) raises.

What it cannot show: that each kernel captures under CUDA, and anything about speed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from host_sync import forbid_host_sync
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))  # holding every tensor keeps their ids unique
        return out


class RecordedGraphs:
    """The `GraphCapture` stand-in; `captures` lists every capture, `replays` counts the replays."""

    def __init__(self) -> None:
        self.captures = 0
        self.replays = 0

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        recorder = _Recorder()
        with forbid_host_sync(), recorder:
            fn()  # runs the step for real, like the CUDA warm-up (the replay after it rewrites the same KV)
        ops = recorder.ops
        self.captures += 1

        def replay() -> None:
            made: dict[int, torch.Tensor] = {}  # id(tensor made while recording) -> its remake

            def swap(x):
                return made.get(id(x), x) if isinstance(x, torch.Tensor) else x

            for func, args, kwargs, out in ops:
                new = func(*tree_map(swap, args), **tree_map(swap, kwargs))
                for old_t, new_t in zip(tree_leaves(out), tree_leaves(new), strict=True):
                    if isinstance(old_t, torch.Tensor):
                        if new_t.shape != old_t.shape:  # a data-dependent shape: a CUDA graph cannot hold it
                            raise AssertionError(
                                f"{func} made shape {tuple(new_t.shape)} on replay, {tuple(old_t.shape)} when captured"
                            )
                        made[id(old_t)] = new_t
            self.replays += 1

        return replay
