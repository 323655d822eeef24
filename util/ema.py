"""An exponential moving average (EMA) of a model's weights, kept in fp32 (--ema_rate).

After every optimizer step, ema = rate * ema + (1 - rate) * weights, for every parameter
(MAR's update_ema, with MAR's flag name). The update is PyTorch's own:
`torch.optim.swa_utils.get_ema_multi_avg_fn`, one fused `torch._foreach_lerp_` over all
parameters. Its `AveragedModel` wrapper is not used: it deep-copies the whole module
(compiled blocks, dropout settings, parameters that require gradients), copies instead of
averaging on its first update, checks a device counter on every update, and names its
state `module.*` plus `n_averaged`; here the average is a plain list of fp32 tensors,
one per parameter, and its state_dict has exactly the model's keys (the checkpoint's
`model_ema`).

Every rank holds its own average of the same (DDP-synchronised) weights, so the averages
are identical without any communication. Memory: one fp32 copy of the parameters.
"""
import contextlib

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

from models.fractalgen import check_state_dict


class EMA:
    """The moving average of `model`'s parameters (the model itself, not a DDP wrapper).

    Starts from the model's current weights; `load_state_dict` puts a checkpoint's
    `model_ema` in their place."""

    def __init__(self, model, rate):
        if not 0 < rate < 1:
            raise ValueError(f"the EMA rate must lie strictly between 0 and 1, got {rate}")
        self.model, self.rate = model, float(rate)
        self.params = list(model.parameters())
        self.averages = [p.detach().to(torch.float32, copy=True) for p in self.params]
        self._update = get_ema_multi_avg_fn(self.rate)

    @torch.no_grad()
    def update(self):
        """Move the average towards the current weights (call after each optimizer step)."""
        self._update(self.averages, [p.detach().float() for p in self.params], None)

    def state_dict(self):
        """The model's state_dict with each parameter replaced by its average: the same
        keys (also of parameters registered under several names) and shapes."""
        average = {id(p): a for p, a in zip(self.params, self.averages)}
        return {name: average.get(id(value), value).detach()
                for name, value in self.model.state_dict(keep_vars=True).items()}

    @torch.no_grad()
    def load_state_dict(self, state):
        """Take the averages from a `model_ema` state_dict: the model's keys and shapes, else
        CheckpointMismatchError (a ValueError) naming what differs."""
        check_state_dict(self.model, state)
        names = {id(p): name for name, p in self.model.named_parameters(remove_duplicate=False)}
        for p, average in zip(self.params, self.averages):
            average.copy_(state[names[id(p)]])

    @contextlib.contextmanager
    def applied(self):
        """Within the block the model holds the averaged weights (for evaluation during
        training); afterwards its own weights again, bit for bit."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            torch._foreach_copy_([p.detach() for p in self.params], self.averages)
        try:
            yield self.model
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.detach() for p in self.params], saved)
