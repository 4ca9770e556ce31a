"""The parametrizations: :class:`PinnedRows` owns the table; :class:`TiedTo` follows it.

Storage: one ``(V, D)`` tensor, the *table*, holds every row in layout order (see
:mod:`.layout`): the pinned rows first, then the free rows. The trainable parameter
(``parametrizations.weight.original``, :attr:`PinnedRows.free_parameter`) is a view of the free
block, so "concatenating" the two blocks costs nothing: the table *is* the merged weight. For
the prefix layout the table is in user order and is returned as the weight without any copy.
The same class pins the entries of an output head's ``(V,)`` bias (a table of 1-element
"rows" sharing the weight's :class:`~embconstraint._mechanism.layout.Layout`).

Split storage (sharded training): under FSDP2 (``fully_shard``) the free rows are a sharded
``DTensor`` outside forward and FSDP's all-gathered Parameter inside it, so they cannot alias a
table. The parametrization then drops the table and keeps the pinned rows apart, as a plain
``(n, D)`` tensor attribute: not a Parameter (FSDP would shard it, optimizers would see it) and
not a buffer (DDP broadcasts every buffer at each forward). The kernels compute from
``(pinned, free)`` without a ``(V, D)`` tensor; ``storage`` says which scheme is in use. A
Parameter is never re-pointed (``set_``) while FSDP manages it. DeepSpeed takes the split
storage too: ZeRO-3 swaps the free rows' data between its partition and the gathered rows, and
ZeRO-1/2 make them a view of DeepSpeed's flat buffer, which re-pointing them would leave behind.
Under ZeRO-3 the weight is read through DeepSpeed's parameter dict (see :func:`install_accessors`).

Nothing here synchronizes host and device during a step: aliasing checks read tensor metadata
only, and index remapping is element-wise.

Members other modules use (read-only unless said): ``num_rows``, ``num_pinned``, ``layout``,
``on_mismatch``, ``free_parameter``, ``ties()``, ``merged()``, ``table(free)``, ``storage``, ``is_split(free)``,
``pinned_block(like)``, ``split_storage()``, ``check_pinned(weight, what)``,
``write_free_rows(weight, free)``, ``load_plain(weight, free, what)``, ``shard`` (tensor parallelism:
the rows of the whole table this rank holds, see :mod:`.tensor_parallel`); ``TiedTo.embedding``.
"""

from __future__ import annotations

import sys
import weakref

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._common import bitwise_equal, max_abs_deviation
from ..exceptions import PinnedRowsError
from .dispatch import functional, storage_ptr, transformed
from .kernels import merge
from .layout import Layout
from .sharded import fsdp_managed, full, is_sharded, like, zero_managed
from .traced import traced
from .weight import plain, wrap

__all__ = ["PinnedRows", "TiedTo", "pin_of", "tie_of", "parametrization_list", "install_accessors"]

_ORIGINAL = "original"  # where parametrize keeps the trainable tensor (see _common.original_key)


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


def _no_module_hooks(m: nn.Module) -> bool:
    """True when ``m(x)`` would run ``m.forward(x)`` directly (``Module.__call__``'s own test)."""
    g = nn.modules.module
    return not (
        m._backward_hooks
        or m._backward_pre_hooks
        or m._forward_hooks
        or m._forward_pre_hooks
        or g._global_backward_pre_hooks
        or g._global_backward_hooks
        or g._global_forward_hooks
        or g._global_forward_pre_hooks
    )


def install_accessors(module: nn.Module, name: str = "weight") -> None:
    """Install, on the per-module class that parametrize created for ``module``: a fast getter
    for ``module.<name>`` (below), and an ``_apply`` that re-syncs the pinned rows after a
    conversion (``.to()``, ``.half()``...: :meth:`PinnedRows.sync`); and fill the row maps that
    a lookup on the weight's device reads.

    The getter replaces the property parametrize injected by one that calls
    :meth:`PinnedRows.forward` directly when that is what parametrize's getter would compute:
    caching off, no tracing, the list holds only our ``PinnedRows`` with no hooks, ``original``
    a registered tensor. Anything else (another parametrization appended, ``parametrize.cached()``,
    hooks, ``torch.compile``) takes parametrize's own getter. Installed on a module tied to a
    constrained one (:class:`TiedTo`), it takes parametrize's getter too, except under ZeRO-3 (below).

    DeepSpeed ZeRO-3 registers hooks on every module, the ``ParametrizationList`` and the
    ``PinnedRows`` included; those would gather the free rows for the list's call only,
    partition them again before the lookup runs, and wrap the weight in an autograd function that
    detaches it from the free rows. For a ZeRO-3 Parameter the getter calls
    :meth:`PinnedRows.eager_weight` directly and reads ``original`` through DeepSpeed's parameter dict,
    which gathers it in forward and registers it as an external parameter of the module running
    (the embedding, or a tied head): from then on DeepSpeed gathers the free rows before that
    module's forward and backward and partitions them after, as for its own weights. A tied head's
    getter calls :meth:`TiedTo.forward` directly for the same reason (its list's hooks would detach
    the weight from the free rows: the head's gradient would not reach them)."""
    cls = type(module)
    prop = cls.__dict__[name]
    slow = prop.fget

    def get(self: nn.Module) -> Tensor:
        if torch.compiler.is_compiling():
            return slow(self)
        if not parametrize._cache_enabled and torch._C._get_tracing_state() is None:
            plist = self._modules["parametrizations"]._modules[name]
            mods, orig = plist._modules, plist._parameters.get(_ORIGINAL)
            if orig is not None and len(mods) == 1:
                pin = mods["0"]  # resolved per call: deepcopy keeps the class, not the PinnedRows
                if type(pin) is PinnedRows:
                    if _no_module_hooks(pin):
                        return pin.eager_weight(orig)
                    if "ds_id" in orig.__dict__:  # DeepSpeed ZeRO-3 (see above)
                        return pin.eager_weight(plist._parameters[_ORIGINAL])
                elif type(pin) is TiedTo and "ds_id" in orig.__dict__:  # a tied head under ZeRO-3: the
                    return pin.forward(
                        orig
                    )  # embedding's getter, which reads the free rows through DeepSpeed
        return slow(self)

    setattr(cls, name, property(get, prop.fset, prop.fdel, prop.__doc__))
    if "_apply" not in cls.__dict__:
        base_apply = cls._apply

        def _apply(self: nn.Module, fn, *args, **kwargs):
            out = base_apply(self, fn, *args, **kwargs)
            for plist in getattr(self, "parametrizations", {}).values():
                for p in plist:
                    if isinstance(p, PinnedRows):
                        p.sync(getattr(self, "padding_idx", None))
            return out

        cls._apply = _apply
    pin = pin_of(module, name)
    if pin is not None:
        pin.sync(getattr(module, "padding_idx", None))


_REMOVE_PARAMETRIZATIONS = parametrize.remove_parametrizations.__code__


def _within_rounding(new: Tensor, old: Tensor) -> bool:
    """Whether every value of ``new`` is within two units in the last place of ``old``'s."""
    if not old.is_floating_point():
        return False
    tol = 2 * torch.finfo(old.dtype).eps
    return bool(((new.double() - old.double()).abs() <= tol * old.double().abs()).all())


def _removing_parametrizations(depth: int = 8) -> bool:
    """Whether ``torch.nn.utils.parametrize.remove_parametrizations`` is reading the weight: it
    ``set_``s the Parameter to the weight's storage, bypassing ``__torch_function__``, so the
    scattered layout must hand it a tensor in user order (a gather, once)."""
    frame = sys._getframe(2)
    while frame is not None and depth:
        if frame.f_code is _REMOVE_PARAMETRIZATIONS:
            return True
        frame, depth = frame.f_back, depth - 1
    return False


SCRIPTING_REFUSED = (
    "torch.jit.script cannot compile a module holding a constrained embedding: torch's parametrizations do not "
    "script; use torch.jit.trace or torch.export, which export the merged weight, or script the "
    "plain model: embconstraint.release(model) first (or load embconstraint.merged_state_dict(model) "
    "into an unconstrained copy)"
)


class PinnedRows(nn.Module):
    """Parametrization ``weight = reference rows ∪ free rows`` (see the module docstring).

    Registered by :func:`embconstraint.constrain`; not meant to be built by hand.
    """

    def __init__(self, reference: Tensor, layout: Layout, on_mismatch: str = "error") -> None:
        super().__init__()
        self._layout = layout
        self.on_mismatch = on_mismatch
        self._reference: Tensor | None = reference  # consumed by the first right_inverse
        self._table: Tensor | None = None
        self._alias_key: tuple | None = None  # see table()
        self._pinned: Tensor | None = None  # the split storage's pinned rows (layout order)
        self._cast: dict[tuple, Tensor] = {}  # the pinned rows on other devices/dtypes (split storage)
        # The pinned rows as pinned (their own dtype), while the table cannot hold them exactly: after
        # a cast to a lower precision, or on the meta device. None while the table's own rows are exact.
        self._exact: Tensor | None = None
        self._owner: list[nn.Module] = []  # the ParametrizationList, once bound (a list: not a child)
        self._ties: list[tuple[nn.Module, str]] = []  # (module, name) tied to this weight (not children)
        self._copied = False  # the free rows live apart from the table (see storage)
        self._user_order: tuple | None = None  # (key, weak reference): see user_order()
        # Tensor parallelism: the rows of the whole table this module holds (a tensor_parallel.RowShard;
        # the layout is then the shard's), None otherwise. Set by constrain(), read by the state dicts.
        self.shard = None

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

    def add_tie(self, module: nn.Module, name: str) -> None:
        """Remember that ``module.<name>`` is tied to this weight (``release`` releases it too)."""
        self._ties.append((module, name))

    def ties(self) -> list[tuple[nn.Module, str]]:
        """The ``(module, name)`` pairs still tied to this weight."""
        return [(m, n) for m, n in self._ties if (t := tie_of(m, n)) is not None and t.pin is self]

    @property
    def free_parameter(self) -> Tensor:
        """The trainable ``(V - n, D)`` tensor (parametrize's ``original``)."""
        return getattr(self._owner[0], _ORIGINAL)

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
            if self._layout.rows is not None and _removing_parametrizations():
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
        if bitwise_equal(new, old) or (rounding and _within_rounding(new, old)):
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
