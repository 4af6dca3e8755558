"""`forbid_host_sync()`: make the Python-level ways of reading a tensor back to the host raise.

On a GPU each of these waits for the device (a host sync) and breaks CUDA-graph capture; on CPU
they are cheap, so only a test like this notices one creeping into the per-step path. Caught:
`.item()`, `.tolist()`, `.cpu()`, `nonzero` (method and function), `masked_select`, Python
conversions (`bool`, `int`, `float`) and boolean-mask indexing (its result's size depends on data).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_METHODS = ("item", "tolist", "cpu", "nonzero", "masked_select", "__bool__", "__int__", "__float__")
_FUNCTIONS = ("nonzero", "masked_select")


class HostSyncError(AssertionError):
    pass


def _has_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.dim() > 0 for i in items)


@contextmanager
def forbid_host_sync() -> Iterator[None]:
    saved_methods = {name: getattr(torch.Tensor, name) for name in (*_METHODS, "__getitem__", "__setitem__")}
    saved_functions = {name: getattr(torch, name) for name in _FUNCTIONS}

    def refuse(name: str):
        def raiser(*args, **kwargs):
            raise HostSyncError(f"host sync: {name} called on the per-step path")

        return raiser

    getitem, setitem = saved_methods["__getitem__"], saved_methods["__setitem__"]

    def checked_getitem(self, index):
        if _has_bool_index(index):
            raise HostSyncError("host sync: boolean-mask indexing on the per-step path")
        return getitem(self, index)

    def checked_setitem(self, index, value):
        if _has_bool_index(index):
            raise HostSyncError("host sync: boolean-mask assignment on the per-step path")
        return setitem(self, index, value)

    try:
        for name in _METHODS:
            setattr(torch.Tensor, name, refuse(f"Tensor.{name}"))
        for name in _FUNCTIONS:
            setattr(torch, name, refuse(f"torch.{name}"))
        torch.Tensor.__getitem__ = checked_getitem
        torch.Tensor.__setitem__ = checked_setitem
        yield
    finally:
        for name, fn in saved_methods.items():
            setattr(torch.Tensor, name, fn)
        for name, fn in saved_functions.items():
            setattr(torch, name, fn)
