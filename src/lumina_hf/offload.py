"""Where a model whose weights accelerate manages (CPU offload, `device_map` over several devices, disk offload)
actually computes, and how to read such a model's weights.

accelerate attaches a hook to each managed module (`module._hf_hook`, the attribute accelerate's own
`align_module_device`, `has_offloaded_params` and diffusers' `_execution_device` read); an offloaded module's
parameters live on the "meta" device between calls, so `module.weight.device` does not say where it runs.
"""

from __future__ import annotations

import contextlib

import torch


def _hook_device(module: torch.nn.Module):
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is None:
        return None
    return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)


def execution_device(model: torch.nn.Module) -> torch.device:
    """The device `model` computes on: the execution device of the first accelerate hook found on it or its
    submodules (CPU offload, `device_map`), else the device of its first parameter or buffer that is not on "meta"."""
    for module in model.modules():
        device = _hook_device(module)
        if device is not None:
            return device
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def is_offloaded(module: torch.nn.Module) -> bool:
    """Whether accelerate keeps `module`'s own weights off its execution device between calls."""
    from accelerate.utils import has_offloaded_params

    return has_offloaded_params(module)


@contextlib.contextmanager
def weights_on_execution_device(module: torch.nn.Module):
    """Inside the block, `module`'s own parameters are real tensors on its execution device, also when accelerate
    offloads them (CPU or disk offload); outside, they go back. A no-op for an ordinary module."""
    from accelerate.utils import align_module_device

    with align_module_device(module):
        yield


__all__ = ["execution_device", "is_offloaded", "weights_on_execution_device"]
