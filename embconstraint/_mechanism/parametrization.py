"""The parametrizations: :class:`PinnedRows` owns the table; :class:`TiedTo` follows it.

:class:`PinnedRows` keeps the rows as :class:`~.storage.RowStorage` stores them (the table, or the
split storage of sharded training) and adds the parametrization: the weight it returns (eager, or
traced under ``torch.compile`` and the exporters), what assigning or loading a weight does, and the
pinned-row check of every write. The same class pins the entries of an output head's ``(V,)`` bias
(a table of 1-element "rows" sharing the weight's :class:`~embconstraint._mechanism.layout.Layout`).

Members other modules use (read-only unless said): ``num_rows``, ``num_pinned``, ``layout``,
``on_mismatch``, ``free_parameter``, ``ties()``, ``merged()``, ``table(free)``, ``storage``, ``is_split(free)``,
``pinned_block(like)``, ``split_storage()``, ``check_pinned(weight, what)``,
``write_free_rows(weight, free)``, ``load_plain(weight, free, what)``, ``shard`` (tensor parallelism:
the rows of the whole table this rank holds, see :mod:`.tensor_parallel`); ``TiedTo.embedding``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._common import bitwise_equal, max_abs_deviation
from ..exceptions import PinnedRowsError
from .dispatch import functional, storage_ptr, transformed
from .guards import SCRIPTING_REFUSED, removing_parametrizations, within_rounding
from .kernels import merge
from .layout import Layout
from .sharded import full, is_sharded, like
from .storage import RowStorage
from .traced import traced
from .weight import plain, wrap

__all__ = ["PinnedRows", "TiedTo", "pin_of", "tie_of", "parametrization_list"]


def parametrization_list(module: nn.Module, name: str) -> nn.Module | None:
    """``module.parametrizations[name]`` (a ``ParametrizationList``), or None."""
    if not parametrize.is_parametrized(module, name):
        return None
    return module.parametrizations[name]


def pin_of(module: nn.Module, name: str = "weight") -> PinnedRows | None:
    """The :class:`PinnedRows` of ``module.<name>``, or None if it is not constrained."""
    plist = parametrization_list(module, name)
    return next((p for p in plist if isinstance(p, PinnedRows)), None) if plist is not None else None


def tie_of(module: nn.Module, name: str) -> TiedTo | None:
    """The :class:`TiedTo` of ``module.<name>``, or None if it is not tied to a constrained embedding."""
    plist = parametrization_list(module, name)
    return next((p for p in plist if isinstance(p, TiedTo)), None) if plist is not None else None


class PinnedRows(RowStorage):
    """Parametrization ``weight = reference rows ∪ free rows`` (see the module docstring).

    Registered by :func:`embconstraint.constrain`; not meant to be built by hand.
    """

    def __init__(self, reference: Tensor, layout: Layout, on_mismatch: str = "error") -> None:
        super().__init__(layout)
        self.on_mismatch = on_mismatch
        self._reference: Tensor | None = reference  # consumed by the first right_inverse
        self._ties: list[tuple[nn.Module, str]] = []  # (module, name) tied to this weight (not children)
        # Tensor parallelism: the rows of the whole table this module holds (a tensor_parallel.RowShard;
        # the layout is then the shard's), None otherwise. Set by constrain(), read by the state dicts.
        self.shard = None

    def add_tie(self, module: nn.Module, name: str) -> None:
        """Remember that ``module.<name>`` is tied to this weight (``release`` releases it too)."""
        self._ties.append((module, name))

    def ties(self) -> list[tuple[nn.Module, str]]:
        """The ``(module, name)`` pairs still tied to this weight."""
        return [(m, n) for m, n in self._ties if (t := tie_of(m, n)) is not None and t.pin is self]

    # -- the parametrization ----------------------------------------------------------------
    def forward(self, free: Tensor) -> Tensor:
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return self._traced_weight(free)
        return self.eager_weight(free)

    def eager_weight(self, free: Tensor) -> Tensor:
        """The weight in eager mode (what the fast getter calls). Fast path: the prefix layout
        with the table as at the last access (``table()``'s own check, inlined): a view of the
        free rows that spans the table (grad mode), or an alias of the table."""
        table, key = self._table, self._alias_key
        if (
            key is not None
            and key[0] is free
            and key[1] is table
            and key[8] is not None
            and free.data_ptr() == key[2]
            and table.data_ptr() == key[3]
            and free.stride() == key[4]
            and free.shape == key[5]
            and free.dtype == key[6]
            and free.device == key[7]
        ):
            if torch.is_grad_enabled():
                return wrap(free.as_strided(*key[8]), self, free, table)
            return wrap(table.detach(), self, free, table)
        return self._weight(free)

    def _weight(self, free: Tensor) -> Tensor:
        if transformed(free) or functional():
            # torch.func (functional_call + grad/vmap, vmap over the ids, jvp), forward-mode AD:
            # a plain, differentiable merge (the kernels define neither a vmap rule nor a jvp)
            return self._layout.to_user_order(torch.cat([self.pinned_block(free), free]))
        if self.is_split(free):
            free = full(free)  # outside forward under FSDP2 (inside, FSDP hands over the whole rows)
            stub = free.new_zeros(()).expand(self.num_rows, *free.shape[1:])  # no (V, D) memory
            return wrap(merge(free, stub, self._user_free_rows(free)), self, free, None)
        table = self.table(free)
        if not torch.is_grad_enabled():  # a constant, as a plain parametrization's weight would be
            if self._layout.rows is not None and removing_parametrizations():
                return self._layout.to_user_order(table)  # its storage becomes the plain weight
            return wrap(table.detach(), self, free, table)
        if self._layout.rows is None and not self._copied:
            # The free rows are the table's last rows: the weight is a view of them that spans
            # the table, so that autograd sees the free rows behind it (its gradient reaches
            # them) without an autograd node of ours. Lookups and heads never use it: their
            # kernels take the free rows and the table.
            return wrap(
                free.as_strided(tuple(table.shape), table.stride(), table.storage_offset()), self, free, table
            )
        # The table holds the rows in layout order (or a copy of the free rows): the weight's
        # autograd node takes a gradient in user order (what code outside hands it) to the free rows.
        return wrap(merge(free, table, self._user_free_rows(free)), self, free, table)

    def _user_free_rows(self, free: Tensor) -> Tensor | None:
        """The user rows of the free rows on ``free``'s device (None for the prefix layout)."""
        return None if self._layout.rows is None else self._layout.free_rows_on(free.device)

    def _traced_weight(self, free: Tensor) -> Tensor:
        """The weight under ``torch.compile`` (a :class:`~.traced.TracedWeight`: lookups and heads
        take the split kernels, nothing of size ``(V, D)`` is built for them), and under
        ``torch.export`` / ``torch.jit.trace`` (the plain merged tensor: ``torch.cat`` of the pinned
        and the free rows, in user order, which every exporter understands)."""
        pinned = self.traced_pinned(free)
        merged = self._layout.to_user_order(torch.cat([pinned, free]))
        if torch.compiler.is_exporting() or torch.jit.is_tracing():
            return merged
        return traced(merged, free, pinned, self._layout)

    def traced_pinned(self, free: Tensor) -> Tensor:
        """The pinned rows (layout order) on ``free``'s device and dtype, by operations that a
        tracer records (no cache is filled: :meth:`sync` fills them ahead of a compiled run)."""
        rows = self._table[: self.num_pinned] if self._table is not None else self._pinned
        if rows.dtype == free.dtype and rows.device == free.device:
            return rows
        source = self._exact if self._exact is not None else rows
        return source.to(device=free.device, dtype=free.dtype)

    def sync(self, padding_idx: int | None = None) -> None:
        """After a conversion of the module (``.to()``, ``.half()``, ``to_empty``...): rebuild the
        table around the converted free rows and fill the row maps of their device (with the
        module's ``padding_idx``), as the next access would, so that compiled code finds them ready."""
        if not self._owner:
            return
        free = self.free_parameter
        if is_sharded(free) or transformed(free):
            return
        if not free.is_meta and not self.is_split(free):
            self.table(free)
        self._layout.prepare(free.device, padding_idx)

    @torch.inference_mode(False)  # a normal table even under inference_mode (later writes need one)
    @torch.no_grad()
    def right_inverse(self, weight: Tensor) -> Tensor:
        weight = plain(weight)
        if self._reference is not None:  # registration: build the table around a copy of the reference
            ref, self._reference = self._reference, None
            if storage_ptr(ref) == storage_ptr(weight):  # e.g. "pin the rows at their current values"
                ref = ref.clone()
            if self._layout.rows is None and weight.is_contiguous() and not weight.is_inference():
                # The prefix layout is the user order: the embedding's own storage becomes the
                # table, so constraining allocates no second (V, D) tensor.
                table = weight.detach()
            else:
                table = torch.empty(
                    (self.num_rows, *weight.shape[1:]), dtype=weight.dtype, device=weight.device
                )
                torch.index_select(
                    weight, 0, self.free_rows().to(weight.device), out=table[self.num_pinned :]
                )
            table[: self.num_pinned] = ref  # copies, casting dtype and device
            self._table = table
            if table.is_meta:  # kept until the module is materialised (to_empty)
                self._exact = ref.to(table.dtype).clone()
            return table[self.num_pinned :]
        # Assignment ``module.weight = value``: value must keep the pinned rows. The free rows get
        # new storage (a new table), as a plain parametrization's would: tensors taken from the
        # weight before (``functional_call`` restores the module from one) keep their values.
        table, n = self._table, self.num_pinned
        self.check_pinned(weight, "weight")
        if table is None:
            rows = self._layout.user_to_layout(weight.to(self._pinned))[n:].clone()
            return like(rows, self.free_parameter)
        new = torch.empty_like(table)
        new[:n] = table[:n]
        new[n:] = self._layout.user_to_layout(weight.to(table))[n:]
        self._table, self._alias_key = new, None
        return new[n:]

    def check_pinned(self, weight: Tensor, what: str, rounding: bool = False, hint: str = "") -> None:
        """Raise :class:`PinnedRowsError` if ``weight`` (user order) does not hold the pinned rows
        bitwise (``rounding``: within two units in the last place of each value, what an average
        ``a * d + (1 - d) * b`` of equal values rounds to); ``ValueError`` if it has another shape."""
        old = self.pinned_block()
        shape = (self.num_rows, *old.shape[1:])
        if tuple(weight.shape) != shape:
            raise ValueError(f"{what} must have shape {shape}, got {tuple(weight.shape)}")
        new = self._layout.user_to_layout(weight.to(old))[: self.num_pinned]
        if bitwise_equal(new, old) or (rounding and within_rounding(new, old)):
            return
        raise PinnedRowsError(
            f"{what} would change pinned rows of a constrained embedding "
            f"(max |Δ| = {max_abs_deviation(new, old):g}); "
            f"pinned rows only change through release() or on_mismatch='checkpoint'{hint}"
        )

    @torch.no_grad()
    def write_free_rows(self, weight: Tensor, free: Tensor) -> None:
        """Write the free rows of ``weight`` (user order; pinned rows already checked)."""
        if self.is_split(free):
            rows = self._layout.user_to_layout(weight)[self.num_pinned :]
            free.copy_(like(rows.to(device=free.device, dtype=free.dtype), free))
            return
        self.table(free)[self.num_pinned :] = self._layout.user_to_layout(weight)[self.num_pinned :]
        if not self._aliased(free):  # the copy path: free rows live apart from the table
            free.copy_(self._table[self.num_pinned :])

    @torch.no_grad()
    def load_plain(self, weight: Tensor, free: Tensor, what: str) -> Tensor:
        """Free rows to load from a plain ``(V, D)`` weight; pinned rows are checked (or adopted)."""
        if not self.is_split(free):
            self.table(free)  # re-aliased first: the pinned rows are then on free's device
        pinned = self.pinned_block()
        if self.on_mismatch == "checkpoint":
            if tuple(weight.shape) == (self.num_rows, *pinned.shape[1:]):
                pinned[:] = self._layout.user_to_layout(weight.to(pinned))[: self.num_pinned]
                self._cast, self._exact = {}, None
        else:
            self.check_pinned(weight, what)
        return self._layout.user_to_layout(weight.to(pinned))[self.num_pinned :]

    def __prepare_scriptable__(self) -> nn.Module:  # torch.jit.script calls it on every submodule
        raise RuntimeError(SCRIPTING_REFUSED)

    def extra_repr(self) -> str:
        return f"rows={self.num_rows}, pinned={self.num_pinned}, layout={self._layout.kind}, storage={self.storage}"


class TiedTo(nn.Module):
    """Parametrization of a module that shares its weight with a constrained embedding
    (e.g. a tied output head): it computes with that embedding's merged weight. ``name`` is the
    constrained tensor it shares (``"bias"``: a head's bias held by another module too, as BERT's
    ``cls.predictions.bias`` is its decoder's)."""

    def __init__(self, embedding: nn.Module, pin: PinnedRows, name: str = "weight") -> None:
        super().__init__()
        self._embedding = [embedding, pin]  # a list keeps them out of this module's children
        self._name = name

    @property
    def embedding(self) -> nn.Module:
        return self._embedding[0]

    @property
    def pin(self) -> PinnedRows:
        """The embedding's :class:`PinnedRows`."""
        return self._embedding[1]

    @property
    def live(self) -> bool:
        """Whether the tensor it is tied to is still constrained by :attr:`pin` (torch's
        ``remove_parametrizations`` on the embedding leaves a plain tie)."""
        return pin_of(self.embedding, self._name) is self.pin

    def forward(self, _: Tensor) -> Tensor:
        return getattr(self.embedding, self._name)

    def __prepare_scriptable__(self) -> nn.Module:
        raise RuntimeError(SCRIPTING_REFUSED)

    def right_inverse(self, value: Tensor) -> Tensor:
        emb_weight = getattr(self.embedding, self._name)
        original = self.pin.free_parameter
        # At registration ``value`` is the shared Parameter, which constrain() already turned
        # into the embedding's free rows (``original``): accept it as the tie itself.
        if (
            value is not original
            and value is not emb_weight
            and not torch.equal(plain(value), plain(emb_weight))
        ):
            raise RuntimeError(
                "a weight tied to a constrained embedding can only be set through the embedding"
            )
        return original
