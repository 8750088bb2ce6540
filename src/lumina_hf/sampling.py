"""Sampling primitives of the image decoding loops: per-row uniform noise, Gumbel-max sampling and top-k.

Sampling uses the Gumbel-max form of multinomial sampling: `argmax(log_softmax(z / T) - log(-log U))` with `U`
uniform noise drawn per row and per step from that row's `torch.Generator` over the codebook (in code order). It
samples exactly the softmax distribution, and makes a row's result independent of the batch it is in (given a
per-row generator) and reproducible by a plain reference loop. Noise drawn on the CPU reaches a CUDA device by a
non-blocking copy, so the loops never wait for the device.
"""

import torch


def normalize_generators(generator, batch_size: int) -> list[torch.Generator] | torch.Generator | None:
    """One generator for the whole batch (returned as is), or a list checked to hold one per image."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch_size:
            raise ValueError(
                f"got a list of {len(generator)} generators for {batch_size} images: give one per image "
                "(prompts x num_images_per_prompt) or a single generator."
            )
        return list(generator)
    return generator


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move `t` to `device` without making the host wait: a CPU tensor bound for a CUDA device goes through
    pinned memory with a non-blocking copy (a plain copy from pageable memory blocks the host until the GPU
    has finished everything queued before it)."""
    device = torch.device(device)
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def draw_uniform(generator, rows: int, n: int, device) -> torch.Tensor:
    """`(rows, n)` uniform noise in (0, 1) on `device`: one draw of `n` per row from that row's generator,
    or one `(rows, n)` draw from a single generator (the global RNG of `device` when None). Each draw is
    made on its generator's device; CPU draws reach a CUDA device by a non-blocking copy."""
    device = torch.device(device)
    if isinstance(generator, list) and all(g.device == device for g in generator):
        # each row filled in place from its own generator: the numbers `torch.rand(n, generator=g)` gives
        u = torch.empty((len(generator), n), device=device)
        for row, g in zip(u, generator):
            row.uniform_(generator=g)
    elif isinstance(generator, list):
        u = torch.stack([_to_device(torch.rand(n, generator=g, device=g.device), device) for g in generator])
    else:
        gen_device = generator.device if generator is not None else device
        u = _to_device(torch.rand((rows, n), generator=generator, device=gen_device), device)
    return u.clamp_(min=torch.finfo(u.dtype).tiny)


def gumbel_sample(logits: torch.Tensor, uniform: torch.Tensor, temperature: float) -> torch.Tensor:
    """Index sampled from `softmax(logits / temperature)` (rows), using the given uniform noise. Entries at
    -inf (filtered by top-k or a constraint) are never chosen."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    gumbel = torch.log(uniform).neg_().log_()  # -Gumbel noise, log(-log(u)), in one buffer
    return torch.argmax(logp.sub_(gumbel), dim=-1)


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Set every logit below the row's k-th largest to -inf (ties with the k-th largest are kept)."""
    if k is None or k <= 0 or k >= logits.shape[-1]:
        return logits
    # the k-th largest value is the smallest of the top k: unsorted selection skips sorting them (half the cost
    # on CPU at k=2000 of 8192) and gives the same threshold
    kth = torch.topk(logits, k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    return logits.masked_fill(logits < kth, float("-inf"))
