"""A tensor derived from a parameter and kept until the parameter changes.

The CPU fast paths run some layers on a re-laid-out or transformed copy of their weights
(Winograd's filters, the box head's fc6 with its columns permuted). Making the copy on every
call would cost as much as what it saves, so it is made on first use and made again only when
the parameter's memory address, version counter, dtype or the arguments change.

In-place operations on the parameter bump its version counter, so ``load_state_dict``,
optimizer steps and ``param.mul_(2)`` under ``torch.no_grad()`` are seen. Writes through
``param.data`` (``param.data.mul_(2)``, ``param.data.copy_(w)``) are not: ``.data`` is
another tensor on the same memory with a version counter of its own, and nothing short of
reading the whole weight on every call would notice them. After such writes call
``clear_weight_caches(model)``.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn


class WeightCache:
    """``cache(param, *args)`` returns ``make(param.detach(), *args)``, computed again only
    when ``param`` or ``args`` changed since the last call."""

    def __init__(self, make: Callable[..., Tensor]):
        self.make = make
        self._key: tuple | None = None
        self._value: Tensor | None = None

    def clear(self) -> None:
        """Drop the value; the next call makes it again."""
        self._key, self._value = None, None

    def __call__(self, param: Tensor, *args) -> Tensor:
        key = (param.data_ptr(), param._version, param.dtype, args)
        if key != self._key:
            self._key, self._value = key, self.make(param.detach(), *args)
        return self._value

    def __getstate__(self) -> dict:
        """Copies and pickles start empty and make the value again on first use: a copied
        parameter is new memory anyway, and some values (oneDNN's packed weights) can be
        neither copied nor saved."""
        return {"make": self.make, "_key": None, "_value": None}


def clear_weight_caches(model: nn.Module) -> None:
    """Clear every ``WeightCache`` held by ``model`` or its submodules, as needed after writing
    to parameters through ``.data``."""
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, WeightCache):
                value.clear()
