"""Language-model data selection (:mod:`mgd.apps.lm_select`), at tiny sizes.

* the pool recipe is deterministic and its splits are disjoint (test never in the pool);
* the tokeniser round-trips printable ASCII and newline;
* every method returns exactly ``k`` distinct valid indices;
* DSIR prefers target-like documents on a constructed toy;
* LESS's Adam feature matches a hand computation on a linear model, its scores a hand
  computation of the cosine formula, and the per-document gradients plain backward passes;
* the metagradient MGD uses matches the float64 full unroll to 1e-8;
* evaluation retrains deterministically from a seed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mgd
import mgd.check
from mgd.apps import lm_select as lm

torch.set_num_threads(1)

TINY_POOL = lm.PoolRecipe(pool_size=80, target_fraction=0.15, n_val=8, n_test=16, n_general=64, doc_chars=32)
TINY_MODEL = lm.ModelConfig(width=16, layers=1, heads=2, context=32, pretrain_steps=5, pretrain_batch=8)
TINY_FT = lm.FineTune(steps=4, batch_size=8)


@pytest.fixture(scope="module")
def pool() -> lm.LMPool:
    return lm.build_pool(TINY_POOL)


@pytest.fixture(scope="module")
def ctx(pool) -> lm.LMContext:
    context = lm.make_context(pool, TINY_MODEL, TINY_FT)
    context.run_seconds = 0.05  # a unit for the cost column; its value is not under test
    return context


# ----------------------------------------------------------------------------- pool and tokeniser


def test_pool_recipe_is_deterministic(pool):
    lm.source_chunks.cache_clear()  # read the files again
    again = lm.build_pool(TINY_POOL)
    assert again.fingerprint() == pool.fingerprint()
    assert (again.docs, again.sources, again.val, again.test, again.general) == (
        pool.docs, pool.sources, pool.val, pool.test, pool.general)
    other = lm.build_pool(lm.PoolRecipe(**{**TINY_POOL.to_dict(), "families": TINY_POOL.families,
                                           "docstring_modules": TINY_POOL.docstring_modules, "seed": 1}))
    assert other.fingerprint() != pool.fingerprint()  # the seed matters


def test_pool_sizes_sources_and_disjoint_splits(pool):
    r = TINY_POOL
    assert len(pool.docs) == len(pool.sources) == r.pool_size
    assert all(len(d) == r.doc_chars for d in pool.docs + pool.val + pool.test + pool.general)
    assert (len(pool.val), len(pool.test), len(pool.general)) == (r.n_val, r.n_test, r.n_general)
    comp = pool.composition(np.arange(len(pool.docs)))
    assert comp["code/email"] == round(r.target_fraction * r.pool_size) == int(pool.is_target.sum())
    assert comp["docstring"] == round(r.docstring_fraction * r.pool_size)
    assert sum(v for s, v in comp.items() if s.startswith("junk/")) == round(r.junk_fraction * r.pool_size)
    assert {s.split("/")[0] for s in comp} == {"code", "docstring", "license", "junk"}
    docs, val, test, general = set(pool.docs), set(pool.val), set(pool.test), set(pool.general)
    assert len(val) == len(pool.val) and len(test) == len(pool.test)
    assert not (val & test) and not (test & docs) and not (val & docs)
    assert not (general & docs) and not (general & val) and not (general & test)


def test_tokeniser_round_trip():
    text = "".join(chr(c) for c in range(32, 127)) + "\n  def f(x):\n    return x\n"
    ids = lm.encode(text)
    assert min(ids) >= 1 and max(ids) == lm.NEWLINE_ID < lm.VOCAB
    assert lm.decode(ids) == text
    assert lm.encode("é") == [lm.PAD_ID] and lm.normalise_text("a\tb\r\né") == "a   b\n?"
    batch = lm.tokenize(["ab", "abcd"])
    assert batch["input_ids"].tolist() == [[lm.encode("a")[0], lm.encode("b")[0], 0, 0], lm.encode("abcd")]
    assert batch["labels"][0].tolist()[2:] == [-100, -100] and batch["attention_mask"].sum() == 6


def test_chunks_are_fixed_length_and_skip_blank_runs():
    chunks = lm.chunk_text("x" * 10 + " " * 15 + "y" * 17, 10)
    # the blank chunk and the 2-character tail are dropped; half-blank is kept (min_fill 0.5)
    assert chunks == ["x" * 10, " " * 5 + "y" * 5, "y" * 10]
    assert lm.chunk_text("\tab\r\n" * 4, 6, min_fill=0.0) == ["    ab", "\n" + "    a", "b\n    ", "ab\n   "]


# ----------------------------------------------------------------------------- methods


def test_every_method_returns_k_distinct_valid_indices(ctx):
    ks = [10, 20]
    produced = [
        [lm.select_random(ctx, k) for k in ks],
        lm.select_dsir(ctx, ks),
        lm.select_perplexity(ctx, ks),
        lm.select_embedding(ctx, ks),
        lm.select_less(ctx, ks, dim=32),
        lm.mgd_select(ctx, lm.mgd_trajectory(ctx, lm.MGDSettings(meta_steps=2), seeds=[0, 1]), ks),
    ]
    for selections in produced:
        for k, sel in zip(ks, selections):
            assert len(sel.indices) == k == len(np.unique(sel.indices)), sel.name
            assert 0 <= sel.indices.min() and sel.indices.max() < ctx.n
            assert sum(sel.info["composition"].values()) == k
            assert sel.seconds >= 0 and math.isfinite(sel.runs)
            again = lm.Selection.from_dict(sel.to_dict())
            assert np.array_equal(again.indices, sel.indices) and again.name == sel.name
    oracle = lm.select_oracle(ctx, 5)
    assert len(oracle.indices) == 5 and ctx.pool.is_target[oracle.indices].all()
    assert len(lm.select_oracle(ctx, 50).indices) == int(ctx.pool.is_target.sum())  # all of them, fewer than k
    assert np.array_equal(lm.select_full(ctx).indices, np.arange(ctx.n))


def test_dsir_prefers_target_like_documents():
    pool = ["a" * 16, "b" * 16, "ab" * 8, "a" * 12 + "b" * 4, "b" * 12 + "a" * 4, "c" * 16]
    target = ["a" * 16, "a" * 15 + "c"]
    logw = lm.dsir_log_weights(pool, target, buckets=1000)
    assert logw[0] > logw[3] > logw[2] > logw[4] > logw[1]
    big_pool = ["a" * 16] * 20 + ["b" * 16] * 80
    picked = lm.gumbel_top_k(lm.dsir_log_weights(big_pool, target, buckets=1000), 20, seed=0)
    assert len(np.unique(picked)) == 20 and (picked < 20).all()
    counts = lm.ngram_features("abab", 1000)
    assert counts.sum() == 4 + 3  # 4 unigrams + 3 bigrams


def test_less_scores_match_the_formula():
    rng = np.random.default_rng(0)
    train = [torch.as_tensor(rng.normal(size=(5, 3))) for _ in range(2)]
    val = [torch.as_tensor(rng.normal(size=(4, 3))) for _ in range(2)]
    lrs, tasks = [0.3, 0.1], np.array([0, 0, 1, 1])

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    from mgd.apps.select import less_scores  # the one definition, shared with lm_select

    scores = less_scores(train, val, tasks, lrs)
    single = less_scores(train, val, np.zeros(4, dtype=np.int64), lrs)
    for i in range(5):
        per_task = [sum(lr * np.mean([cos(t[i], v[j]) for j in range(4) if tasks[j] == c])
                        for t, v, lr in zip(train, val, lrs)) for c in (0, 1)]
        assert scores[i] == pytest.approx(max(per_task), rel=1e-10)
        mean_all = sum(lr * np.mean([cos(t[i], v[j]) for j in range(4)]) for t, v, lr in zip(train, val, lrs))
        assert single[i] == pytest.approx(mean_all, rel=1e-10)


def test_per_document_grads_match_single_backward_passes(ctx):
    model = ctx.base_model()
    params = {n: p for n, p in model.named_parameters() if "h.0.attn" in n}
    data = {k: v[:3] for k, v in ctx.pool_data.items()}
    grads = lm.per_document_grads(model, params, data)
    assert grads.shape == (3, sum(p.numel() for p in params.values()))
    loss_fn = mgd.losses.causal_lm()
    for i in range(3):
        batch = {k: v[i : i + 1] for k, v in data.items()}
        model.zero_grad()
        loss_fn(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), batch)[0].backward()
        expected = torch.cat([p.grad.reshape(-1) for p in params.values()])
        assert torch.allclose(grads[i], expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(grads[0], grads[1])


# ----------------------------------------------------------------------------- MGD and evaluation


def test_mgd_metagradient_matches_float64_full_unroll(pool, ctx):
    ctx64 = lm.make_context(pool, TINY_MODEL, lm.FineTune(steps=3, batch_size=8), dtype=torch.float64,
                            pretrained=ctx.pretrained)
    run, objective = lm.mgd_problem(ctx64, seed=0)
    assert run.dtype == torch.float64 and run.num_params == sum(p.numel() for p in run.model.parameters())
    w = torch.linspace(0.5, 1.5, ctx64.n, dtype=torch.float64)  # away from the all-ones start
    result = mgd.metagradient(run, objective, {"data_weights": w}, wrt=["data_weights"], k=2)
    _, reference = mgd.check.full_unroll_metagradient(run, objective, {"data_weights": w}, wrt=["data_weights"])
    grad = result.grads["data_weights"]
    assert grad.abs().max() > 0 and int((grad != 0).sum()) <= 3 * 8  # only the documents the run saw
    assert mgd.check.relative_error(grad, reference["data_weights"]) < 1e-8
    lora_run, lora_objective = lm.mgd_problem(ctx64, seed=0, regime="lora")
    lora = mgd.metagradient(lora_run, lora_objective, {"data_weights": w}, wrt=["data_weights"], k=2)
    _, lora_ref = mgd.check.full_unroll_metagradient(lora_run, lora_objective, {"data_weights": w},
                                                     wrt=["data_weights"])
    assert lora_run.num_params < run.num_params
    assert mgd.check.relative_error(lora.grads["data_weights"], lora_ref["data_weights"]) < 1e-8


def test_evaluation_is_deterministic_given_the_seed(ctx):
    indices = np.arange(0, ctx.n, 3)
    for regime in ("full", "lora"):
        a = lm.evaluate_subset(ctx, indices, regime=regime, seed=100)
        b = lm.evaluate_subset(ctx, indices, regime=regime, seed=100)
        c = lm.evaluate_subset(ctx, indices, regime=regime, seed=101)
        keys = ("val_loss", "val_accuracy", "test_loss", "test_accuracy")
        assert all(a[k] == b[k] for k in keys) and all(math.isfinite(a[k]) for k in keys)
        assert a["test_loss"] != c["test_loss"]  # the seed changes batch order and dropout
    base = lm.finetune_run(ctx, ctx.pool_data, regime="full", seed=0)
    pretrained = lm.evaluate_state(base, base.init_state(), ctx.test_data)
    assert a["test_loss"] != pretrained["loss"]  # fine-tuning moved the model


def test_paired_difference_and_budget_errors(ctx):
    a = [{"seed": 1, "x": 1.0}, {"seed": 2, "x": 3.0}]
    b = [{"seed": 1, "x": 0.5}, {"seed": 2, "x": 2.0}]
    assert lm.paired_difference(a, b, "x")["mean"] == pytest.approx(0.75)
    with pytest.raises(mgd.UserError):
        lm.paired_difference(a, b[::-1], "x")
    with pytest.raises(mgd.UserError):
        ctx.k_of(0.0)
    assert ctx.k_of(0.25) == 20
