"""How a :class:`~.parametrization.PinnedRows` stores its rows: the table, or the split storage.

Storage: one ``(V, D)`` tensor, the *table*, holds every row in layout order (see
:mod:`.layout`): the pinned rows first, then the free rows. The trainable parameter
(``parametrizations.weight.original``, :attr:`RowStorage.free_parameter`) is a view of the free
block, so "concatenating" the two blocks costs nothing: the table *is* the merged weight. For
the prefix layout the table is in user order and is returned as the weight without any copy.

Split storage (sharded training): under FSDP2 (``fully_shard``) the free rows are a sharded
``DTensor`` outside forward and FSDP's all-gathered Parameter inside it, so they cannot alias a
table. The parametrization then drops the table and keeps the pinned rows apart, as a plain
``(n, D)`` tensor attribute: not a Parameter (FSDP would shard it, optimizers would see it) and
not a buffer (DDP broadcasts every buffer at each forward). The kernels compute from
``(pinned, free)`` without a ``(V, D)`` tensor; ``storage`` says which scheme is in use. A
Parameter is never re-pointed (``set_``) while FSDP manages it. DeepSpeed takes the split
storage too: ZeRO-3 swaps the free rows' data between its partition and the gathered rows, and
ZeRO-1/2 make them a view of DeepSpeed's flat buffer, which re-pointing them would leave behind.
Under ZeRO-3 the weight is read through DeepSpeed's parameter dict (see
:func:`~.accessors.install_accessors`).

Nothing here synchronizes host and device during a step: aliasing checks read tensor metadata
only, and index remapping is element-wise.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from .dispatch import storage_ptr
from .layout import Layout
from .sharded import fsdp_managed, full, is_sharded, zero_managed

__all__ = ["RowStorage", "ORIGINAL"]

ORIGINAL = "original"  # where parametrize keeps the trainable tensor (see _common.original_key)


class RowStorage(nn.Module):
    """The rows of a constrained tensor, as stored (see the module docstring): the base of
    :class:`~.parametrization.PinnedRows`, which adds what makes it a parametrization."""

    def __init__(self, layout: Layout) -> None:
        super().__init__()
        self._layout = layout
        self._table: Tensor | None = None
        self._alias_key: tuple | None = None  # see table()
        self._pinned: Tensor | None = None  # the split storage's pinned rows (layout order)
        self._cast: dict[tuple, Tensor] = {}  # the pinned rows on other devices/dtypes (split storage)
        # The pinned rows as pinned (their own dtype), while the table cannot hold them exactly: after
        # a cast to a lower precision, or on the meta device. None while the table's own rows are exact.
        self._exact: Tensor | None = None
        self._owner: list[nn.Module] = []  # the ParametrizationList, once bound (a list: not a child)
        self._copied = False  # the free rows live apart from the table (see storage)
        self._user_order: tuple | None = None  # (key, weak reference): see user_order()

    # -- read-only members ------------------------------------------------------------------
    @property
    def layout(self) -> Layout:
        """The row layout (user order <-> table order)."""
        return self._layout

    @property
    def num_rows(self) -> int:
        return self._layout.num_rows

    @property
    def num_pinned(self) -> int:
        return self._layout.num_pinned

    def pinned_rows(self) -> Tensor:
        """User rows of the pinned rows, in reference order (CPU, int64)."""
        return self._layout.pinned_rows()

    def free_rows(self) -> Tensor:
        """User rows of the free rows, in increasing order (CPU, int64)."""
        return self._layout.free_rows()

    def bind(self, parametrizations: nn.Module) -> None:
        """Remember the ``ParametrizationList`` this parametrization was registered in."""
        self._owner[:] = [parametrizations]

    def unbind(self) -> None:
        """Forget the ``ParametrizationList`` (once removed), so that no reference cycle keeps it,
        and the Parameter it held, alive until the next garbage collection."""
        self._owner.clear()

    @property
    def free_parameter(self) -> Tensor:
        """The trainable ``(V - n, D)`` tensor (parametrize's ``original``)."""
        return getattr(self._owner[0], ORIGINAL)

    def merged(self) -> Tensor:
        """The merged ``(V, D)`` weight in user order, without autograd history (the table
        itself for the prefix layout: clone it before writing)."""
        return self.user_order(self.free_parameter)

    @torch.no_grad()
    def user_order(self, free: Tensor) -> Tensor:
        """The table in user order, without autograd history: the table itself for the prefix
        layout; for the scattered layout a gather, shared by every caller while it is alive and
        the rows are unchanged, so that the weight of an embedding and of a head tied to it are
        one tensor (one storage, one ``data_ptr()``) wherever they are read at once."""
        table = self.table(free)
        if self._layout.rows is None:
            return table
        key = (table.data_ptr(), table._version, free.data_ptr(), free._version)
        cached = self._user_order
        user = cached[1]() if cached is not None and cached[0] == key else None
        if user is None:
            with torch.inference_mode(False):
                user = self._layout.to_user_order(table)
            self._user_order = (key, weakref.ref(user))
        return user

    # -- the storage ----------------------------------------------------------------------------
    @property
    def storage(self) -> str:
        """How the rows are stored: ``"aliased"`` (one table, the free rows a view of it),
        ``"copy"`` (a wrapper replaced the free rows by a tensor that cannot be re-aliased: the
        table is refreshed from it at each access) or ``"split"`` (sharded training: the pinned
        rows apart, no table)."""
        if self._table is None:
            return "split"
        return "copy" if self._copied else "aliased"

    def is_split(self, free: Tensor) -> bool:
        """Whether ``free`` is computed with the split storage; switches to it (once, for good)
        when ``free`` is sharded, or FSDP or DeepSpeed manages the parameter."""
        if self._table is None:
            return True
        if is_sharded(free) or (self._owner and fsdp_managed(self._owner[0])) or zero_managed(free):
            self.split_storage()
            return True
        return False

    @torch.no_grad()
    def split_storage(self) -> None:
        """Keep the pinned rows apart and drop the table (what sharded training needs)."""
        if self._table is None:
            return
        table, n = self._table, self.num_pinned
        self._pinned, self._table, self._cast, self._alias_key = table[:n].clone(), None, {}, None
        free = self.free_parameter if self._owner else None
        if (
            isinstance(free, nn.Parameter)
            and not is_sharded(free)
            and storage_ptr(free) == storage_ptr(table)
        ):
            free.set_(free.clone())  # its own storage, so that the table is freed

    def pinned_block(self, like: Tensor | None = None) -> Tensor:
        """The pinned rows ``(n, D)`` in layout order (on ``like``'s device and dtype if given:
        cached, the pinned rows never change)."""
        rows = self._table[: self.num_pinned] if self._table is not None else self._pinned
        if like is None or (rows.device == like.device and rows.dtype == like.dtype):
            return rows
        key = (like.device, like.dtype)
        if key not in self._cast:
            with torch.inference_mode(False):  # cached: a normal tensor whatever the caller's mode
                self._cast[key] = rows.to(device=like.device, dtype=like.dtype)
        return self._cast[key]

    # -- the table ------------------------------------------------------------------------------
    def _aliased(self, free: Tensor) -> bool:
        table = self._table
        return (
            table is not None
            and not is_sharded(free)  # (a DTensor has no storage to compare)
            and free.device == table.device
            and free.dtype == table.dtype
            and free.untyped_storage().data_ptr() == table.untyped_storage().data_ptr()
            and free.storage_offset() == table.storage_offset() + self.num_pinned * table[0].numel()
            and free.shape == (self.num_rows - self.num_pinned, *table.shape[1:])
            and free.stride() == table.stride()
            and table.is_contiguous()
        )

    def table(self, free: Tensor) -> Tensor:
        """The table, re-built around ``free`` if a conversion (``.to``, ``.half``, a loader,
        a distributed wrapper) separated them. Re-aliases ``free`` when it is a Parameter.
        With the split storage: a new ``(V, D)`` tensor (sharded free rows are all-gathered)."""
        # Fast path: the same free and table objects as at the last positive aliasing check, with
        # the same addresses and metadata. The key holds both tensors, so neither block of memory
        # can have been freed and reused meanwhile: free is still the table's free block.
        table, key = self._table, self._alias_key
        if (
            key is not None
            and key[0] is free
            and key[1] is table
            and free.data_ptr() == key[2]
            and table.data_ptr() == key[3]
            and free.stride() == key[4]
            and free.shape == key[5]
            and free.dtype == key[6]
            and free.device == key[7]
        ):
            return table
        if self._aliased(free):
            # (and, for the prefix layout, the view of free that spans the table: see eager_weight)
            view = (
                (tuple(table.shape), table.stride(), table.storage_offset())
                if self._layout.rows is None
                else None
            )
            self._alias_key = (
                free,
                table,
                free.data_ptr(),
                table.data_ptr(),
                free.stride(),
                free.shape,
                free.dtype,
                free.device,
                view,
            )
            return table
        self._alias_key = None
        with torch.no_grad():
            if self.is_split(free):
                free = full(free)
                return torch.cat([self.pinned_block(free), free])
            return self._rebuild(free)

    @torch.inference_mode(
        False
    )  # a normal tensor whatever the caller's mode (evaluating first, then training)
    @torch.no_grad()  # (inference_mode(False) turns grad mode on)
    def _rebuild(self, free: Tensor) -> Tensor:
        old, n = self._table, self.num_pinned
        if self._exact is None and old.dtype != free.dtype:
            self._exact = old[:n].clone()  # cast from these, once, by every later conversion
        table = torch.empty((self.num_rows, *free.shape[1:]), dtype=free.dtype, device=free.device)
        table[:n] = self._exact if self._exact is not None else old[:n]
        table[n:] = free
        self._table = table
        if self._exact is not None and self._exact.dtype == table.dtype and not table.is_meta:
            self._exact = None  # exact again in the table (e.g. after .half().float())
        if isinstance(free, nn.Parameter) and free.is_leaf:
            free.set_(table[n:])
            self._copied = False
        else:
            self._copied = True
        return table
