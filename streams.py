"""Where the random numbers of block diffusion come from (sampler.py draws them in transformers'
order: per canvas one randint, per step one multinomial then one randint).

  shared   torch's default generator, for the whole batch at once: a seed reproduces transformers
           token for token, batch included (the parity tests)
  per row  a generator per row, seeded by that row's seed, drawn only while the row is denoised:
           a row's text depends on its prompt and its seed alone, not on the batch it ran in
For a batch of one the two are the same draws. A fast path draws one key per row instead
(RandomStreams.keys), from which a counter-based sampler makes all of a step's numbers.

    import torch; from streams import RandomStreams
    rng = RandomStreams([0, 1], "cpu")
    noise = rng.randint(50, 2, 8, torch.ones(2, dtype=torch.bool))
"""

import torch


class RandomStreams:
    """Where a loop's random numbers come from: torch's default generator shared by the batch
    (seeds None), or one generator per row seeded by seeds[row]. `drawing` (B,) bool says which rows
    draw; per-row streams skip the others (a row alone would not draw there), the shared stream
    draws for every row, as transformers does."""

    def __init__(self, seeds: list[int] | None, device):
        self.device = torch.device(device)
        self.generators = None if seeds is None else [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]

    @property
    def per_row(self) -> bool:
        return self.generators is not None

    def rows(self, drawing: torch.Tensor, draw, C: int) -> torch.Tensor:
        """(B, C): draw(row, generator) -> (C,) for the rows that draw, zeros (unused) for the others."""
        zeros = torch.zeros(C, dtype=torch.long, device=self.device)
        return torch.stack([draw(b, g) if on else zeros
                            for b, (g, on) in enumerate(zip(self.generators, drawing.tolist()))])

    def randint(self, high: int, B: int, C: int, drawing: torch.Tensor) -> torch.Tensor:
        """(B, C) uniformly random token ids in [0, high)."""
        if not self.per_row:
            return torch.randint(0, high, (B, C), device=self.device)
        return self.rows(drawing, lambda b, g: torch.randint(0, high, (1, C), device=self.device, generator=g)[0], C)

    def multinomial(self, probs: torch.Tensor, drawing: torch.Tensor) -> torch.Tensor:
        """(B, C): one sample per position of probs (B, C, V)."""
        B, C, V = probs.shape
        if not self.per_row:
            return torch.multinomial(probs.view(-1, V), num_samples=1).view(B, C)
        return self.rows(drawing, lambda b, g: torch.multinomial(probs[b], 1, generator=g)[:, 0], C)

    def keys(self, drawing: torch.Tensor) -> torch.Tensor:
        """(B,) int64 keys of a counter-based sampler (cuda_kernels.sampler_stats), one per row:
        from each row's stream, or all from the shared one."""
        B = len(drawing)
        if not self.per_row:
            return torch.randint(0, 2 ** 62, (B,), device=self.device)
        return self.rows(drawing, lambda b, g: torch.randint(0, 2 ** 62, (1,), device=self.device, generator=g), 1)[:, 0]
