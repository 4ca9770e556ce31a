"""``embconstraint.hf.init_new_tokens``: new tokens' rows from their subwords, the old mean or a
description, with a real BPE tokenizer built in code (``tokenizers``, nothing downloaded).

Every expected row is computed here from a snapshot of the weights taken before the call and from
an independent old tokenizer (a ``copy.deepcopy`` taken before ``add_tokens``), never from the
function's own helpers.
"""

from __future__ import annotations

import copy
import math
import os
import random
import re
import sys
from pathlib import Path

import pytest
import torch
from helpers.hf import bpe_tokenizer_json, fast_tokenizer, tiny_llama_config
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
from helpers import run_python  # noqa: E402
from tokenizers import AddedToken  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from embconstraint import is_constrained, release  # noqa: E402
from embconstraint._common import bitwise_equal  # noqa: E402
from embconstraint._mechanism import pin_of, tie_of  # noqa: E402
from embconstraint.hf import InitializedToken, constrain_new_tokens, init_new_tokens  # noqa: E402
from embconstraint.hf.init import _values  # noqa: E402

D = 8
WORDS = ["kalomi", "raveno", "sudobi"]  # ordinary words: several pieces each
CHAT = ["<|user|>", "<|assistant|>"]  # special tokens: their text means nothing
DESCRIPTIONS = {"<|user|>": "ka lo", "<|assistant|>": "su te no"}
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "new_tokens_init.py"


@pytest.fixture(scope="module")
def base_json() -> str:
    """A BPE tokenizer trained on generated text (its backend, serialized)."""
    return bpe_tokenizer_json()


def tokenizer(base_json: str) -> PreTrainedTokenizerFast:
    return fast_tokenizer(base_json)


def grown(
    base_json: str,
    *,
    tied: bool = False,
    bias: bool = False,
    pad_to: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """(model, tokenizer, old tokenizer, old vocabulary size): a Llama "pretrained" on the old
    vocabulary, the words and chat tokens added, the model resized (transformers' mean init)."""
    tok = tokenizer(base_json)
    old_tok, old_vocab = copy.deepcopy(tok), len(tok)
    torch.manual_seed(seed)
    cfg = tiny_llama_config(old_vocab, D, tied=tied, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg)
    if bias:
        model.lm_head = nn.Linear(D, old_vocab, bias=True)
    model.to(dtype)
    tok.add_tokens(WORDS)
    tok.add_special_tokens({"additional_special_tokens": CHAT})
    model.resize_token_embeddings(len(tok), pad_to_multiple_of=pad_to)
    return model, tok, old_tok, old_vocab


def tables(model) -> dict[str, torch.Tensor]:
    """Snapshot of every row that could be written: embedding, head, head bias."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    out = {"emb": emb.weight.detach().clone()}
    if head.weight is not emb.weight and tie_of(head, "weight") is None:  # untied
        out["head"] = head.weight.detach().clone()
        if head.bias is not None:
            out["bias"] = head.bias.detach().clone()
    return out


def pieces(old_tok, text: str) -> list[int]:
    """The ids of ``text`` under the old tokenizer, the unknown token skipped."""
    return [i for i in old_tok.encode(text, add_special_tokens=False) if i != old_tok.unk_token_id]


def expected_rows(before, tok, old_tok, texts: dict[str, str]) -> dict[str, dict[int, torch.Tensor]]:
    """{table: {row: the mean of the old table's rows of ``texts[token]``'s pieces}}."""
    return {
        name: {
            tok.convert_tokens_to_ids(t): w[pieces(old_tok, text)].float().mean(0).to(w.dtype)
            for t, text in texts.items()
        }
        for name, w in before.items()
    }


def assert_written(model, before, expected) -> None:
    """The expected rows are there (bitwise), every other row is unchanged (bitwise)."""
    after = tables(model)
    assert after.keys() == before.keys()
    for name, w in after.items():
        rows = sorted(expected[name])
        for r in rows:
            assert bitwise_equal(w[r], expected[name][r]), (name, r)
        keep = torch.ones(w.shape[0], dtype=torch.bool)
        keep[rows] = False
        assert bitwise_equal(w[keep], before[name][keep]), name


@pytest.mark.parametrize("constrained", [False, True], ids=["plain", "constrained"])
@pytest.mark.parametrize("head", ["tied", "untied", "bias"])
def test_subwords_and_descriptions_write_only_the_new_rows(base_json, head, constrained):
    model, tok, old_tok, old_vocab = grown(base_json, tied=head == "tied", bias=head == "bias", pad_to=16)
    assert (
        model.get_input_embeddings().num_embeddings == 64 > len(tok)
    )  # padding rows, which belong to no token
    if constrained:
        constrain_new_tokens(model, old_vocab)
    before = tables(model)
    done = init_new_tokens(model, tok, WORDS + CHAT, descriptions=DESCRIPTIONS)

    texts = {**{w: w for w in WORDS}, **DESCRIPTIONS}
    assert done == [
        InitializedToken(
            t,
            tok.convert_tokens_to_ids(t),
            "description" if t in CHAT else "subwords",
            texts[t],
            tuple(pieces(old_tok, texts[t])),
        )
        for t in WORDS + CHAT
    ]
    assert all(len(d.pieces) > 1 for d in done)  # every text really is several old pieces
    assert_written(model, before, expected_rows(before, tok, old_tok, texts))
    if constrained:
        for m in (model.get_input_embeddings(), model.get_output_embeddings()):
            if pin_of(m) is not None:
                assert torch.equal(pin_of(m).pinned_rows(), torch.arange(old_vocab))
    if head == "tied":
        assert torch.equal(model.get_output_embeddings().weight, model.get_input_embeddings().weight)


@pytest.mark.parametrize("head", ["tied", "untied", "bias"])
def test_ends_reads_the_last_piece_and_predicts_the_first(base_json, head):
    model, tok, old_tok, _ = grown(base_json, tied=head == "tied", bias=head == "bias")
    constrain_new_tokens(model, len(old_tok))
    before = tables(model)
    done = init_new_tokens(model, tok, WORDS + CHAT, method="ends", descriptions={"<|user|>": "ka lo"})
    assert [d.method for d in done] == ["ends"] * 3 + ["description-ends", "ends"]
    texts = {**{w: w for w in WORDS}, "<|user|>": "ka lo", "<|assistant|>": "<|assistant|>"}
    assert old_tok.unk_token_id in old_tok.encode("<|assistant|>")  # "<", "|", ">" are unknown: skipped
    expected = {name: {} for name in before}
    for t, text in texts.items():
        p, row = pieces(old_tok, text), tok.convert_tokens_to_ids(t)
        assert len(p) > 1 and p[0] != p[-1]
        if head == "tied":  # the ends of its text, or of its description
            picks = {"emb": [p[0], p[-1]]}
        else:
            picks = {"emb": [p[-1]], "head": [p[0]], "bias": [p[0]]}
        for name, w in before.items():
            expected[name][row] = w[picks[name]].mean(0)
    assert_written(model, before, expected)


def test_old_tokenizer_given_or_derived_agree(base_json):
    model, tok, old_tok, _ = grown(base_json)
    same = copy.deepcopy(model)
    a = init_new_tokens(model, tok, WORDS)
    b = init_new_tokens(same, tok, WORDS, old_tokenizer=old_tok)
    c = init_new_tokens(copy.deepcopy(same), tok, WORDS, old_tokenizer=old_tok.backend_tokenizer)
    assert a == b == c
    assert all(torch.equal(x, y) for x, y in zip(tables(model).values(), tables(same).values(), strict=True))
    assert tok.get_vocab() == old_tok.get_vocab() | {t: tok.convert_tokens_to_ids(t) for t in WORDS + CHAT}
    assert tok.tokenize("kalomi lo") == ["kalomi", "lo"]  # the tokenizer itself was not changed


def test_added_token_objects_are_accepted(base_json):
    model, tok, old_tok, _ = grown(base_json)
    done = init_new_tokens(model, tok, [AddedToken(w) for w in WORDS])
    assert [d.token for d in done] == WORDS and [d.pieces for d in done] == [
        tuple(pieces(old_tok, w)) for w in WORDS
    ]


@pytest.mark.parametrize("head", ["tied", "bias"])
def test_mean_is_the_mean_of_the_old_rows(base_json, head):
    model, tok, old_tok, old_vocab = grown(base_json, tied=head == "tied", bias=head == "bias", pad_to=16)
    before = tables(model)
    done = init_new_tokens(model, tok, WORDS + CHAT, method="mean")
    assert [(d.method, d.text, d.pieces) for d in done] == [("mean", "", ())] * len(done)
    old_ids = sorted(old_tok.get_vocab().values())
    assert old_ids == list(range(old_vocab))
    expected = {
        name: {tok.convert_tokens_to_ids(t): w[old_ids].mean(0) for t in WORDS + CHAT}
        for name, w in before.items()
    }
    assert_written(model, before, expected)


def test_mean_with_a_covariance_sample_is_seeded_and_hewitts(base_json):
    scale = 1e-2
    model, tok, _, old_vocab = grown(base_json, bias=True)
    new = WORDS + CHAT
    rows = [tok.convert_tokens_to_ids(t) for t in new]
    twin, other = copy.deepcopy(model), copy.deepcopy(model)
    before = tables(model)
    init_new_tokens(model, tok, new, method="mean", covariance_scale=scale, seed=3)
    init_new_tokens(twin, tok, new, method="mean", covariance_scale=scale, seed=3)
    init_new_tokens(other, tok, new, method="mean", covariance_scale=scale, seed=4)
    after, again, differ = tables(model), tables(twin), tables(other)
    assert all(torch.equal(after[k], again[k]) for k in after)
    assert not torch.equal(after["emb"][rows], differ["emb"][rows])

    # independently: x = mean + sqrt(s / n) (X - mean)^T z, the draws z taken from the same seeded
    # generator (embedding first, then the head's weight and bias from one draw), in float64
    g = torch.Generator().manual_seed(3)
    for names in (["emb"], ["head", "bias"]):
        z = torch.randn(len(new), old_vocab, generator=g, dtype=torch.float64)
        for name in names:
            x = before[name][:old_vocab].double().reshape(old_vocab, -1)
            expect = x.mean(0) + math.sqrt(scale / old_vocab) * z @ (x - x.mean(0))
            got = after[name][rows].double().reshape(len(new), -1)
            torch.testing.assert_close(got, expect.float().double(), rtol=1e-5, atol=1e-6)
        keep = torch.ones(before[name].shape[0], dtype=torch.bool)
        keep[rows] = False
        assert all(bitwise_equal(after[n][keep], before[n][keep]) for n in names)


def test_the_covariance_sample_has_the_old_rows_covariance():
    """Many draws of the sampler: their covariance is ``scale * Sigma`` (Sigma singular here: 6 old
    rows in 10 dimensions, where a MultivariateNormal could not even be built)."""
    g = torch.Generator().manual_seed(0)
    olds = torch.randn(6, 10, generator=g)
    table = torch.cat([olds, torch.zeros(1, 10)])  # one new row, its value irrelevant
    n, draws, scale = 6, 20000, 0.5
    plan = [InitializedToken("t", 6, "mean", "", ())] * draws
    (out,) = _values([table], "input", plan, list(range(n)), scale, torch.Generator().manual_seed(1))
    centered = olds - olds.mean(0)
    sigma = centered.T @ centered / n
    torch.testing.assert_close(out.mean(0), olds.mean(0), rtol=0, atol=0.03)
    torch.testing.assert_close(torch.cov(out.T, correction=0), scale * sigma, rtol=0, atol=0.03)


def test_lower_precision_rows_are_computed_in_float32(base_json):
    model, tok, old_tok, _ = grown(base_json, dtype=torch.bfloat16)
    before = tables(model)
    init_new_tokens(model, tok, WORDS)
    assert_written(model, before, expected_rows(before, tok, old_tok, {w: w for w in WORDS}))


def test_peft_model_and_scattered_free_rows(base_json):
    peft = pytest.importorskip("peft")
    model, tok, old_tok, old_vocab = grown(base_json, bias=True)
    new_rows = [tok.convert_tokens_to_ids(t) for t in WORDS + CHAT]
    # pin every row but the new ones and two old rows, in a scrambled order: a scattered layout
    keep = [r for r in range(len(tok)) if r not in new_rows and r not in (3, 9)]
    random.Random(0).shuffle(keep)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    constrain_new_tokens(lora, len(keep), indices=keep)
    assert "layout=scattered" in repr(pin_of(model.get_input_embeddings()))
    plain, _, _, _ = grown(base_json, bias=True)
    before = tables(model)
    assert all(torch.equal(before[k], v) for k, v in tables(plain).items())  # same start

    done = init_new_tokens(lora, tok, WORDS + CHAT, descriptions=DESCRIPTIONS)
    init_new_tokens(plain, tok, WORDS + CHAT, descriptions=DESCRIPTIONS)
    assert [d.row for d in done] == new_rows
    texts = {**{w: w for w in WORDS}, **DESCRIPTIONS}
    assert_written(model, before, expected_rows(before, tok, old_tok, texts))
    assert all(torch.equal(v, tables(plain)[k]) for k, v in tables(model).items())


def snapshot_unchanged(model):
    before = tables(model)
    pins = [
        (m, m.parametrizations.weight.original.detach().clone())
        for m in model.modules()
        if pin_of(m) is not None
    ]

    def check() -> None:
        after = tables(model)
        assert all(bitwise_equal(after[k], v) for k, v in before.items())
        assert all(bitwise_equal(m.parametrizations.weight.original, free) for m, free in pins)

    return check


REFUSALS = [
    ({"new_tokens": ["kalomi", "zzz"]}, ValueError, r"the tokenizer does not know \['zzz'\]"),
    (
        {"new_tokens": ["kalomi", "lo"]},
        ValueError,
        r"\['lo'\] are not new: they are in the tokenizer's base vocabulary",
    ),
    ({"new_tokens": ["ж"]}, ValueError, r"the text of 'ж' \('ж'\) splits into no old token"),
    (
        {"descriptions": {"<|user|>": "щ щ"}},
        ValueError,
        r"description of '<\|user\|>' \('щ щ'\) splits into no old",
    ),
    ({"descriptions": {"<|user|>": ""}}, ValueError, r"description of '<\|user\|>' is empty"),
    (
        {"descriptions": {"<|system|>": "ka"}},
        ValueError,
        r"descriptions name tokens that are not being added: \['<\|system\|>'\]",
    ),
    (
        {"method": "description", "descriptions": {"<|user|>": "ka"}},
        ValueError,
        r"method='description' needs a description for every token; missing: \['kalomi', 'raveno', 'sudobi', ",
    ),
    (
        {"method": "random"},
        ValueError,
        r"method must be one of \('subwords', 'ends', 'mean', 'description'\), got 'random'",
    ),
    ({"covariance_scale": -1.0}, ValueError, r"covariance_scale must be a finite number >= 0, got -1.0"),
    (
        {"covariance_scale": float("nan"), "method": "mean"},
        ValueError,
        "covariance_scale must be a finite number",
    ),
    (
        {"covariance_scale": 1e-5},
        ValueError,
        r"covariance_scale applies to method='mean' only, got method='subwords'",
    ),
    ({"seed": 1.5}, TypeError, "seed must be an int, got float"),
    ({"new_tokens": "kalomi"}, TypeError, "new_tokens must be a list of tokens"),
    ({"new_tokens": [3]}, TypeError, "new_tokens must hold str or tokenizers.AddedToken, got int"),
    ({"new_tokens": []}, ValueError, "new_tokens is empty"),
    ({"new_tokens": ["kalomi", "kalomi"]}, ValueError, r"new_tokens must be distinct, got \['kalomi'\]"),
    ({"descriptions": ["ka"]}, TypeError, "descriptions must be a mapping"),
    (
        {"descriptions": {"<|user|>": 3}},
        TypeError,
        "descriptions must map str to str, got '<\\|user\\|>': int",
    ),
    (
        {"old_tokenizer": "gpt2"},
        TypeError,
        "old_tokenizer must be a transformers tokenizer or a tokenizers.Tokenizer",
    ),
]


@pytest.mark.parametrize("constrained", [False, True], ids=["plain", "constrained"])
@pytest.mark.parametrize(("kwargs", "error", "match"), REFUSALS, ids=[m[:40] for _, _, m in REFUSALS])
def test_refusals_change_nothing(base_json, kwargs, error, match, constrained):
    model, tok, _, old_vocab = grown(base_json, bias=True)
    tok.add_tokens(["ж"])
    model.resize_token_embeddings(len(tok))
    if constrained:
        constrain_new_tokens(model, old_vocab)
    unchanged = snapshot_unchanged(model)
    args = {"new_tokens": WORDS + CHAT} | kwargs
    with pytest.raises(error, match=match):
        init_new_tokens(model, tok, **args)
    unchanged()


def test_refusals_of_the_model_and_the_tokenizers(base_json):
    model, tok, old_tok, old_vocab = grown(base_json, bias=True)
    unchanged = snapshot_unchanged(model)
    with pytest.raises(
        ValueError, match=r"\['kalomi', 'raveno', 'sudobi'\] are not new: old_tokenizer already knows them"
    ):
        init_new_tokens(model, tok, WORDS, old_tokenizer=tok)
    with pytest.raises(ValueError, match=r"splits into ids \[62\], which are new rows or beyond"):
        init_new_tokens(
            model,
            tok,
            CHAT,
            descriptions={"<|user|>": "<|assistant|> ka"},
            old_tokenizer=_ForgetsOnly(tok, CHAT),
        )
    with pytest.raises(TypeError, match="has no tokenizers backend .* pass old_tokenizer"):
        init_new_tokens(model, _NoBackend(tok), WORDS)
    with pytest.raises(TypeError, match="tokenizer must be a transformers tokenizer"):
        init_new_tokens(model, object(), WORDS)
    with pytest.raises(TypeError, match="model must have a get_input_embeddings"):
        init_new_tokens(nn.Linear(2, 2), tok, WORDS)
    unchanged()

    small, tok2, _, _ = grown(base_json)
    small.resize_token_embeddings(old_vocab + 2)  # too few rows for the new tokens
    unchanged = snapshot_unchanged(small)
    with pytest.raises(ValueError, match=r"input embeddings have 60 rows but \[\('sudobi', 60\)"):
        init_new_tokens(small, tok2, WORDS)
    unchanged()

    untied, tok3, _, _ = grown(base_json)
    untied.lm_head = nn.Linear(D, 10, bias=False)
    with pytest.raises(
        ValueError, match="get_output_embeddings\\(\\) has 10 rows but the input embeddings have 63"
    ):
        init_new_tokens(untied, tok3, WORDS)
    untied.lm_head = nn.Conv1d(1, 1, 1)
    with pytest.raises(
        TypeError, match="must be an nn.Linear or share the input embedding's weight, got Conv1d"
    ):
        init_new_tokens(untied, tok3, WORDS)


class _NoBackend:
    """A tokenizer without a ``tokenizers`` backend (as a slow tokenizer)."""

    def __init__(self, tok):
        self.get_vocab = tok.get_vocab


class _ForgetsOnly:
    """An "old tokenizer" that knows the words (wrongly): their rows are new ones."""

    def __init__(self, tok, forget):
        self.tok, self.forget = tok, forget
        self.unk_token_id = tok.unk_token_id

    def get_vocab(self):
        return {k: v for k, v in self.tok.get_vocab().items() if k not in self.forget}

    def encode(self, text, add_special_tokens=False):
        return self.tok.encode(text, add_special_tokens=add_special_tokens)


@pytest.mark.parametrize("head", ["tied", "untied"])
def test_pinned_rows_are_refused(base_json, head):
    model, tok, _, _ = grown(base_json, tied=head == "tied")
    everything = model.get_input_embeddings().num_embeddings
    constrain_new_tokens(model, everything)  # every row pinned: the new tokens' rows too
    unchanged = snapshot_unchanged(model)
    where = "input embeddings"
    with pytest.raises(ValueError, match=rf"the rows of \[\('kalomi', 58\).* are pinned in the {where}"):
        init_new_tokens(model, tok, WORDS)
    unchanged()


def test_recipe_add_resize_init_constrain_train_save_reload(base_json, tmp_path):
    """Ordinary words and special tokens, ``pad_to_multiple_of``, initialise, constrain, train,
    save (model and tokenizer) and reload: the same weights and the same tokenization."""
    model, tok, old_tok, old_vocab = grown(base_json, pad_to=16)
    old_rows = tables(model)
    init_new_tokens(model, tok, WORDS + CHAT, descriptions=DESCRIPTIONS)
    initialised = tables(model)
    params = constrain_new_tokens(model, old_vocab)
    opt = torch.optim.AdamW(params, lr=1e-2)
    text = "<|user|> kalomi lo raveno <|assistant|> sudobi ka"
    ids = tok(text, return_tensors="pt").input_ids
    assert tok.convert_ids_to_tokens(ids[0]) == [
        "<|user|>",
        "kalomi",
        "lo",
        "raveno",
        "<|assistant|>",
        "sudobi",
        "ka",
    ]
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    trained = tables(model)
    for name in trained:
        assert bitwise_equal(trained[name][:old_vocab], old_rows[name][:old_vocab])
        assert not torch.equal(trained[name][old_vocab : len(tok)], initialised[name][old_vocab : len(tok)])
    logits = model(input_ids=ids).logits.detach()
    release(model)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok_again = AutoTokenizer.from_pretrained(tmp_path)
    assert not any(is_constrained(m) for m in again.modules())
    assert all(bitwise_equal(v, tables(again)[k]) for k, v in trained.items())
    assert tok_again(text).input_ids == tok(text).input_ids and len(tok_again) == len(tok)
    assert torch.equal(again(input_ids=ids).logits, logits)


@pytest.mark.slow
@pytest.mark.subprocess
def test_example_runs(tmp_path):
    root = str(EXAMPLE.parent.parent)  # this checkout's embconstraint, not another installed one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    result = run_python(EXAMPLE, tmp_path / "out", timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "old rows bitwise equal after training: True" in out
    assert "reloaded: same weights, same tokenization: True" in out
    loss = dict(re.findall(r"held-out loss, ([^:]+): +([0-9.]+) nats/word", out))
    assert set(loss) == {
        "old tokenization",
        "new tokens, resize default",
        "new tokens, subwords",
        "new tokens, ends",
        "new tokens, mean",
        "new tokens, 40 steps",
    }
    best = min(float(loss[f"new tokens, {m}"]) for m in ("subwords", "ends", "mean"))
    assert best < float(loss["new tokens, resize default"])  # the kept start beats transformers' default
    assert float(loss["new tokens, 40 steps"]) < best


@pytest.mark.slow
def test_benchmark_quick(tmp_path, capsys):
    """``python -m benchmarks.new_token_init --quick`` (about 15 s): the table, the JSON, and the
    issue's claim on its one seed: ``subwords`` starts closer to the old tokenization than ``mean``."""
    sys.path.insert(0, str(EXAMPLE.parent.parent))
    from benchmarks.new_token_init import METHODS, main

    result = main(["--quick", "--json", str(tmp_path / "r.json")])
    summary = result["summary"]
    assert summary["steps"] == [0, 10, 20] and set(summary["methods"]) == set(METHODS)
    assert (tmp_path / "r.json").is_file() and "| subwords |" in capsys.readouterr().out
    step0 = {m: r["step0"] for m, r in summary["methods"].items()}
    assert step0["subwords"] < step0["mean"] and step0["ends"] < step0["subwords"]
    assert step0["mean"] == pytest.approx(
        step0["hf-default"], abs=1e-3
    )  # the default is the mean, 1e-9 noise
    for m, r in summary["methods"].items():
        assert math.isfinite(r["final"]) and r["final"] < r["step0"], m


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
