"""The demo's data: sentences generated in code, each naming a produce item by its context.

The task: predict a produce item from a short context sentence ("we bought some sour citrus
zest at the market" -> lemon). Context words reveal the item's category (fruits go in desserts,
vegetables in soups) and some of its attributes, shared between a few items.

>>> data = make_data(seed=0)
>>> len(data.items), len(data.old_items), data.describe(0)   # doctest: +ELLIPSIS
(16, 12, '... -> ...')
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DemoData", "make_data"]


def _items(table: str) -> list[tuple[str, str, list[str]]]:
    """Rows of "name category attribute words..." (attribute words: clues shared by a few items)."""
    return [(row[0], row[1], row[2:]) for row in (line.split() for line in table.strip().splitlines())]


_OLD_ITEMS = _items("""
    apple     fruit     red crunchy shiny orchard
    banana    fruit     yellow long peeled bunch
    cherry    fruit     small round dark pit
    grape     fruit     green small bunch vine
    lemon     fruit     yellow sour zest citrus
    orange    fruit     orange round peeled citrus
    carrot    vegetable orange long crunchy root
    potato    vegetable yellow round starchy mashed
    onion     vegetable layers round peeled bulb
    spinach   vegetable green leafy dark wilted
    broccoli  vegetable green florets steamed stem
    pepper    vegetable red crunchy shiny stuffed
""")
_NEW_ITEMS = _items("""
    mango     fruit     orange tropical pit juicy
    pear      fruit     green orchard stem juicy
    pumpkin   vegetable orange round seeds carved
    cucumber  vegetable green long crunchy juicy
""")
_CATEGORY_WORDS = {
    "fruit": ["sweet", "dessert", "smoothie", "snack", "jam", "tart"],
    "vegetable": ["roast", "soup", "stew", "savory", "side", "stirfry"],
}
_FILLER = ["the", "a", "we", "i", "bought", "ate", "some", "fresh", "at", "market", "today", "for", "lunch"]
_CONTEXT_LEN = 6  # 1 category word, 2 attribute words, 3 fillers
_TRAIN_PER_ITEM, _TEST_PER_ITEM = 80, 40
_VAGUE = 0.3  # share of training sentences that only reveal the category
_OFF_CATEGORY = 0.05  # share of sentences whose category word belongs to the other category


@dataclass
class DemoData:
    """Generated sentences: ``contexts`` are ``(N, 6)`` word ids, ``targets`` item ids.

    Items ``0..11`` are the old vocabulary, ``12..15`` the new items.
    """

    items: list[str]
    categories: list[str]
    words: list[str]
    train_contexts: Tensor
    train_targets: Tensor
    test_contexts: Tensor
    test_targets: Tensor

    @property
    def old_items(self) -> list[str]:
        return self.items[: len(_OLD_ITEMS)]

    @property
    def num_old(self) -> int:
        return len(_OLD_ITEMS)

    def subset(self, split: str, num_items: int) -> tuple[Tensor, Tensor]:
        """``(contexts, targets)`` of ``split`` ("train"/"test") whose target is below ``num_items``."""
        contexts, targets = getattr(self, f"{split}_contexts"), getattr(self, f"{split}_targets")
        keep = targets < num_items
        return contexts[keep], targets[keep]

    def describe(self, i: int, split: str = "train") -> str:
        """Test sentence ``i`` as text, e.g. ``'we bought some sour citrus zest -> lemon'``."""
        contexts, targets = getattr(self, f"{split}_contexts"), getattr(self, f"{split}_targets")
        return " ".join(self.words[w] for w in contexts[i].tolist()) + f" -> {self.items[int(targets[i])]}"


def make_data(seed: int = 0) -> DemoData:
    """Generate the demo's sentences (deterministic for a given ``seed``).

    >>> data = make_data(seed=0)
    >>> data.items[:3], data.items[12:], tuple(data.test_contexts.shape)
    (['apple', 'banana', 'cherry'], ['mango', 'pear', 'pumpkin', 'cucumber'], (640, 6))
    """
    catalog = _OLD_ITEMS + _NEW_ITEMS
    words = list(_FILLER)
    for ws in _CATEGORY_WORDS.values():
        words += ws
    for _, _, attrs in catalog:
        words += [a for a in attrs if a not in words]
    word_id = {w: i for i, w in enumerate(words)}
    g = torch.Generator().manual_seed(seed)

    def pick(seq: list[str], k: int) -> list[str]:
        return [seq[i] for i in torch.randperm(len(seq), generator=g)[:k].tolist()]

    def sentences(per_item: int, vague: float) -> tuple[Tensor, Tensor]:
        contexts, targets = [], []
        for item, (_, category, attrs) in enumerate(catalog):
            for _ in range(per_item):
                if float(torch.rand((), generator=g)) < _OFF_CATEGORY:
                    category = "vegetable" if category == "fruit" else "fruit"
                if float(torch.rand((), generator=g)) < vague:
                    ws = pick(_CATEGORY_WORDS[category], 2) + pick(_FILLER, 4)
                else:
                    ws = pick(_CATEGORY_WORDS[category], 1) + pick(attrs, 2) + pick(_FILLER, 3)
                order = torch.randperm(len(ws), generator=g).tolist()
                contexts.append([word_id[ws[i]] for i in order])
                targets.append(item)
                category = catalog[item][1]
        return torch.tensor(contexts), torch.tensor(targets)

    train_x, train_y = sentences(_TRAIN_PER_ITEM, _VAGUE)
    test_x, test_y = sentences(_TEST_PER_ITEM, 0.0)
    return DemoData(
        [n for n, _, _ in catalog], [c for _, c, _ in catalog], words, train_x, train_y, test_x, test_y
    )
