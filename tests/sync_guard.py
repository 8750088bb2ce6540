"""A guard that fails on any device-to-host read while it is active, for checking on CPU that a loop never
makes the host wait for the GPU.

Two layers:
- the Python methods that turn a tensor into a host value (`item`, `tolist`, `__int__`, `__bool__`,
  `__float__`, `__index__`, `__complex__`, `cpu`, `numpy`) are wrapped on `torch.Tensor` and raise;
- a dispatch mode sees every ATen operator, including the ones C++ code runs on its own behalf (e.g.
  `torch.arange(tensor)` reads the tensor's value through `aten._local_scalar_dense`), and raises on the
  operators that read values on the host or whose output shape depends on the data.

What it cannot see: copies that only synchronise on CUDA (a blocking host-to-device copy from pageable
memory, `torch.cuda.synchronize()`, an event wait), syncs inside compiled code (Dynamo/Inductor kernels run
below the dispatch mode), allocator-driven syncs (cudaFree on a cache flush), and reads done by native
libraries without dispatching an operator. On a GPU, `torch.cuda.set_sync_debug_mode("error")` covers the
first group; see tests/test_cuda.py.
"""

import contextlib

import torch
# `TorchDispatchMode` is the documented extension point for intercepting ATen operators (the
# `__torch_dispatch__` docs import it from here); torch has no other public path to it.
from torch.utils._python_dispatch import TorchDispatchMode

HOST_READ_METHODS = ("item", "tolist", "__int__", "__bool__", "__float__", "__index__", "__complex__", "cpu", "numpy")

_aten = torch.ops.aten
HOST_READ_OPS = {
    _aten._local_scalar_dense.default,  # every scalar read: item(), int(t), bool(t), arange(t), ...
    _aten.is_nonzero.default,
    _aten.equal.default,
    _aten.nonzero.default,  # data-dependent output shapes (boolean indexing goes through nonzero)
    _aten.nonzero_static.default,
    _aten.masked_select.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.unique_consecutive.default,
    _aten.repeat_interleave.Tensor,
}


class HostReadError(AssertionError):
    pass


class _OpGuard(TorchDispatchMode):
    def __init__(self, seen: list[str]):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READ_OPS:
            self.seen.append(str(func))
            raise HostReadError(f"device-to-host read inside the guarded region: aten op {func}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_reads():
    """Raise `HostReadError` on any device-to-host read while the block runs. Yields the list of offending
    calls (filled even when the code under test swallows the exception)."""
    seen: list[str] = []
    # (own attribute of torch.Tensor or inherited from the C base class, value)
    originals = {name: (name in vars(torch.Tensor), getattr(torch.Tensor, name)) for name in HOST_READ_METHODS}

    def make(name):
        def refuse(self, *args, **kwargs):
            seen.append(f"Tensor.{name}")
            raise HostReadError(f"device-to-host read inside the guarded region: Tensor.{name}()")

        return refuse

    for name in HOST_READ_METHODS:
        setattr(torch.Tensor, name, make(name))
    try:
        with _OpGuard(seen):
            yield seen
    finally:
        for name, (own, fn) in originals.items():
            if own:
                setattr(torch.Tensor, name, fn)
            else:
                delattr(torch.Tensor, name)
