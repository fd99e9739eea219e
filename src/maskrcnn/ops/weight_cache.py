"""A tensor derived from a parameter and kept until the parameter changes.

The CPU fast paths run some layers on a re-laid-out or transformed copy of their weights
(Winograd's filters, the box head's fc6 with its columns permuted). Making the copy on every
call would cost as much as what it saves, so it is made on first use and made again only when
the parameter's memory, version counter (which in-place writes such as ``load_state_dict``
bump), dtype or the arguments change.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor


class WeightCache:
    """``cache(param, *args)`` returns ``make(param.detach(), *args)``, computed again only
    when ``param`` or ``args`` changed since the last call."""

    def __init__(self, make: Callable[..., Tensor]):
        self.make = make
        self._key: tuple | None = None
        self._value: Tensor | None = None

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
