"""The row layout of a constrained weight: user order <-> table order.

The *table* holds every row of the ``(V, D)`` weight: the ``n`` pinned rows first (in reference
order), then the ``V - n`` free rows in increasing user order. When the pinned rows are the first
``n`` user rows the table is in user order ("prefix" layout, ``rows is None``); otherwise it is a
permutation of the user rows ("scattered" layout). No autograd and no ``nn.Module`` here.

>>> lay = Layout.from_indices(torch.tensor([3, 1]), num_pinned=2, num_rows=5)
>>> lay.kind, lay.rows.tolist(), lay.free_rows().tolist()
('scattered', [3, 1, 0, 2, 4], [0, 2, 4])
>>> lay.index(torch.tensor([1, 3, 4]), None)[0].tolist()    # user ids -> table rows
[1, 0, 4]
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Layout"]


class Layout:
    """Where each user row lives in the table, with a per-device cache of the inverse map.

    ``rows`` maps table row -> user row (``None`` for the prefix layout); ``pos`` is its inverse.
    """

    @torch.inference_mode(False)  # normal tensors whatever the caller's mode (autograd saves them)
    def __init__(self, rows: Tensor | None, num_pinned: int, num_rows: int) -> None:
        self.num_rows, self.num_pinned = num_rows, num_pinned
        self.rows = rows
        self.pos = (
            None if rows is None else torch.empty_like(rows).index_copy_(0, rows, torch.arange(num_rows))
        )
        self._device_pos: dict[torch.device, Tensor] = {}
        self._device_free: dict[torch.device, Tensor] = {}
        self._free_maps: dict[tuple[torch.device, torch.dtype, int], Tensor] = {}
        self._table_rows: dict[int, int] = {}  # user row -> table row, for padding indices

    @classmethod
    @torch.inference_mode(False)
    def from_indices(cls, indices: Tensor | None, num_pinned: int, num_rows: int) -> Layout:
        """The layout that pins reference row ``i`` at user row ``indices[i]`` (validated, CPU int64)
        or, for ``None`` (or ``indices == arange(n)``), at the first ``n`` rows."""
        if indices is None or torch.equal(indices, torch.arange(num_pinned)):
            return cls(None, num_pinned, num_rows)
        free = torch.ones(num_rows, dtype=torch.bool)
        free[indices] = False
        return cls(torch.cat([indices, free.nonzero().flatten()]), num_pinned, num_rows)

    @property
    def kind(self) -> str:
        """``"prefix"`` (table in user order) or ``"scattered"``."""
        return "prefix" if self.rows is None else "scattered"

    def pinned_rows(self) -> Tensor:
        """User rows of the pinned rows, in reference order (CPU, int64)."""
        if self.rows is None:
            return torch.arange(self.num_pinned)
        return self.rows[: self.num_pinned]

    def free_rows(self) -> Tensor:
        """User rows of the free rows, in increasing order (CPU, int64)."""
        if self.rows is None:
            return torch.arange(self.num_pinned, self.num_rows)
        return self.rows[self.num_pinned :]

    @property
    def cached_devices(self) -> tuple[torch.device, ...]:
        """The devices that hold a copy of the user row -> table row map."""
        return tuple(self._device_pos)

    def free_rows_on(self, device: torch.device) -> Tensor:
        """:meth:`free_rows` on ``device`` (cached)."""
        rows = self._device_free.get(device)
        if rows is None:
            with torch.inference_mode(False):  # cached: a normal tensor whatever the caller's mode
                rows = self._device_free[device] = self.free_rows().to(device)
        return rows

    def pos_on(self, device: torch.device) -> Tensor:
        """The user row -> table row map on ``device`` (cached; scattered layout only)."""
        pos = self._device_pos.get(device)
        if pos is None:
            with torch.inference_mode(False):  # cached: a normal tensor whatever the caller's mode
                pos = self._device_pos[device] = self.pos.to(device)
        return pos

    def free_map(self, device: torch.device, dtype: torch.dtype, lpad: int) -> Tensor:
        """The user row -> free-row position map (``V - n``, the sink, for pinned rows and for
        table row ``lpad``), on ``device`` in index ``dtype`` (cached: 8 bytes a row for int64).

        >>> Layout.from_indices(torch.tensor([3, 1]), 2, 5).free_map(torch.device("cpu"), torch.int64, -1).tolist()
        [0, 3, 1, 3, 2]
        """
        key = (device, dtype, lpad)
        fmap = self._free_maps.get(key)
        if fmap is None:
            with torch.inference_mode(False):  # cached: a normal tensor whatever the caller's mode
                num_free = self.num_rows - self.num_pinned
                by_table_row = torch.full((self.num_rows,), num_free, dtype=torch.int64)
                by_table_row[self.num_pinned :] = torch.arange(num_free)
                if lpad >= 0:
                    by_table_row[lpad] = num_free
                fmap = by_table_row if self.pos is None else by_table_row[self.pos]
                fmap = self._free_maps[key] = fmap.to(device=device, dtype=dtype)
        return fmap

    def table_row(self, row: int) -> int:
        """The table row of user row ``row`` (a Python int; cached, so that compiled code reads it
        without a device sync)."""
        if self.pos is None:
            return row
        out = self._table_rows.get(row)
        if out is None:
            out = self._table_rows[row] = int(self.pos[row])
        return out

    def prepare(self, device: torch.device, padding_idx: int | None = None) -> None:
        """Fill the caches a lookup on ``device`` reads (with ``padding_idx``), ahead of compiled code."""
        lpad = -1 if padding_idx is None else self.table_row(padding_idx % self.num_rows)
        if self.pos is not None:
            self.pos_on(device)
        self.free_rows_on(device)
        self.free_map(device, torch.int64, lpad)

    def index(self, input: Tensor, padding_idx: int | None) -> tuple[Tensor, int]:
        """User ids and padding index remapped to table rows (``-1``: no padding row).
        Element-wise: no host-device synchronization."""
        lpad = -1
        if padding_idx is not None:
            lpad = self.table_row(padding_idx + self.num_rows if padding_idx < 0 else padding_idx)
        if self.pos is None:
            return input, lpad
        # An id outside [0, V) (negative ones included: no wrapping) maps to row V, which the lookup
        # refuses exactly as plain torch refuses the id itself.
        valid = (input >= 0) & (input < self.num_rows)
        return torch.where(
            valid, self.pos_on(input.device)[input.clamp(0, self.num_rows - 1)], self.num_rows
        ), lpad

    def to_user_order(self, table: Tensor) -> Tensor:
        """The table's rows in user order (the table itself for the prefix layout, a gather otherwise)."""
        if self.pos is None:
            return table
        return table.index_select(0, self.pos_on(table.device))

    def user_to_layout(self, weight: Tensor) -> Tensor:
        """A ``(V, D)`` weight in user order, in table order."""
        if self.rows is None:
            return weight
        return weight.index_select(0, self.rows.to(weight.device))
