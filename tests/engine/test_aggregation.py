"""Aggregation rules against independent dense references (numpy on the dense out x in updates)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import numpy as np
import pytest

from hetlora.protocol.plan import Tier
from hetlora.protocol.settings import TrainingSettings
from hetlora.protocol.spec import AdapterSpec, LoRAModule
from hetlora.protocol.wire import Adapter
from hetlora.engine.aggregation import RULES, ClientResult, aggregate_statistics, make_rule
from hetlora.engine.aggregation.linalg import truncated_svd_of_product, update_norm
from tests.helpers.server import assert_matches_reference, reference_global

R = 6
RANKS = (2, 3, 5)
N_SAMPLES = (10, 30, 60)
# sum of ranks 10: hlora QRs both stacks of "tall"; "wide" has min(out, in) = 5 < R, the edge case.
SPEC = AdapterSpec(
    model_hash="test", task="classification", targets=("dense",),
    modules={"tall": LoRAModule("tall", 16, 20), "wide": LoRAModule("wide", 10, 5)},
    dense={"head.weight": (3, 7), "head.bias": (3,)},
)
ATOL = 1e-5



def plan_indices(rule, *, global_rank, rank, round_number, client_id, seed):
    """The component indices of a client's plan (plora; None for the other rules)."""
    return rule.configure(round_number=round_number, client_key=client_id, tier=Tier(rank), global_rank=global_rank,
                          seed=seed, training=TrainingSettings()).indices

def upload(rng: np.random.Generator, rank: int, client_id: str = "c") -> Adapter:
    lora = {name: (rng.normal(size=(rank, m.in_features)).astype(np.float32),
                   rng.normal(size=(m.out_features, rank)).astype(np.float32))
            for name, m in SPEC.modules.items()}
    dense = {name: rng.normal(size=shape).astype(np.float32) for name, shape in SPEC.dense.items()}
    return Adapter(lora=lora, dense=dense, meta={"client_id": client_id, "rank": rank})


def trained_global(rng: np.random.Generator, rule) -> Adapter:
    """A round-0 global whose B is no longer 0 (so 'keeps its previous value' is visible)."""
    global_ = rule.init_global(SPEC, R, seed=1)
    for name, (a, b) in global_.lora.items():
        b[...] = rng.normal(size=b.shape)
    return global_


def mixed_results(rng, ranks=RANKS, n=N_SAMPLES):
    return [ClientResult(upload(rng, r, f"c{k}"), n_k) for k, (r, n_k) in enumerate(zip(ranks, n))]


def dense_update(a, b):
    return np.asarray(b, np.float64) @ np.asarray(a, np.float64)


def pad(a, b, rank):
    """Zero-pad A (r x in) and B (out x r) to rank R (the reference, not the rule's code)."""
    a_pad = np.zeros((rank, a.shape[1]))
    b_pad = np.zeros((b.shape[0], rank))
    a_pad[: a.shape[0]] = a
    b_pad[:, : b.shape[1]] = b
    return a_pad, b_pad


def dense_mean(tensors, n):
    n = np.asarray(n, np.float64)
    return sum(n_k * np.asarray(t, np.float64) for n_k, t in zip(n, tensors)) / n.sum()


# ---------------------------------------------------------------- factored linear algebra


def test_update_norm_equals_dense_frobenius_norm():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 11)), rng.normal(size=(13, 4))
    assert update_norm(a, b) == pytest.approx(np.linalg.norm(b @ a, "fro"), rel=1e-12)
    assert update_norm(a, np.zeros_like(b)) == 0.0


@pytest.mark.parametrize("out, inp, m", [(30, 20, 8), (6, 5, 12), (30, 5, 8), (5, 30, 8)])
def test_truncated_svd_of_product_matches_dense_svd(out, inp, m):
    rng = np.random.default_rng(1)
    b, a = rng.normal(size=(out, m)), rng.normal(size=(m, inp))
    u, s, vt = truncated_svd_of_product(b, a, 4)
    u_ref, s_ref, vt_ref = np.linalg.svd(b @ a)
    np.testing.assert_allclose(s, s_ref[:4], rtol=1e-10)
    np.testing.assert_allclose((u * s) @ vt, (u_ref[:, :4] * s_ref[:4]) @ vt_ref[:4], atol=1e-9)
    np.testing.assert_allclose(u.T @ u, np.eye(4), atol=1e-10)
    np.testing.assert_allclose(vt @ vt.T, np.eye(4), atol=1e-10)


def test_truncated_svd_of_product_drops_zero_singular_values():
    rng = np.random.default_rng(2)
    u, s, vt = truncated_svd_of_product(rng.normal(size=(10, 2)), rng.normal(size=(2, 8)), 4)  # rank 2
    assert s.shape == (2,) and u.shape == (10, 2) and vt.shape == (2, 8)
    u, s, vt = truncated_svd_of_product(np.zeros((6, 3)), np.zeros((3, 4)), 2)
    assert s.shape == (0,) and u.shape == (6, 0) and vt.shape == (0, 4)


def test_truncated_svd_of_product_is_accurate_under_cancellation():
    """Two clients whose updates almost cancel: the stacked factors are far larger than their product."""
    rng = np.random.default_rng(3)
    b, a = rng.normal(size=(40, 6)), rng.normal(size=(6, 30))
    b_stack = np.hstack([b, b + 1e-4 * rng.normal(size=b.shape)])
    a_stack = np.vstack([a, -a + 1e-4 * rng.normal(size=a.shape)])
    u, s, vt = truncated_svd_of_product(b_stack, a_stack, 5)
    u_ref, s_ref, vt_ref = np.linalg.svd(b_stack @ a_stack)
    scale = np.linalg.norm(b_stack) * np.linalg.norm(a_stack)
    assert s_ref[0] < 1e-3 * scale
    np.testing.assert_allclose(s, s_ref[:5], atol=1e-12 * scale)
    np.testing.assert_allclose((u * s) @ vt, (u_ref[:, :5] * s_ref[:5]) @ vt_ref[:5], atol=1e-12 * scale)


# ---------------------------------------------------------------- hetlora


def sparsity_weights(results, weighting, name):
    s = np.array([np.linalg.norm(dense_update(*r.adapter.lora[name]), "fro") for r in results])
    n = np.array([r.n_samples for r in results], np.float64)
    scores = {"sparsity": s, "sparsity_n": n * s, "n": n}[weighting]
    return scores / scores.sum()


@pytest.mark.parametrize("weighting", ["sparsity", "sparsity_n", "n"])
def test_hetlora_zero_pads_and_weights_by_dense_update_norm(weighting):
    rng = np.random.default_rng(2)
    rule = make_rule("hetlora", weighting=weighting)
    global_ = trained_global(rng, rule)
    results = mixed_results(rng)
    new = rule.aggregate(global_, results)
    for name in SPEC.modules:
        p = sparsity_weights(results, weighting, name)
        padded = [pad(*r.adapter.lora[name], R) for r in results]
        a_ref = sum(p_k * a for p_k, (a, _) in zip(p, padded))
        b_ref = sum(p_k * b for p_k, (_, b) in zip(p, padded))
        a, b = new.lora[name]
        assert a.dtype == b.dtype == np.float32
        np.testing.assert_allclose(a, a_ref, atol=ATOL)
        np.testing.assert_allclose(b, b_ref, atol=ATOL)
        # Zero padding: the component beyond every client's rank (5 = max rank) is 0.
        assert not a[max(RANKS):].any() and not b[:, max(RANKS):].any()


def test_hetlora_falls_back_to_sample_weights_when_every_update_is_zero():
    rng = np.random.default_rng(3)
    rule = make_rule("hetlora")
    results = mixed_results(rng)
    for res in results:
        for _, b in res.adapter.lora.values():
            b[...] = 0.0
    new = rule.aggregate(rule.init_global(SPEC, R, seed=0), results)
    for name in SPEC.modules:
        a_ref = dense_mean([pad(*r.adapter.lora[name], R)[0] for r in results], N_SAMPLES)
        np.testing.assert_allclose(new.lora[name][0], a_ref, atol=ATOL)
        assert np.isfinite(new.lora[name][1]).all()


@pytest.mark.parametrize("weighting", ["sparsity", "n"])
def test_hetlora_segment_average_renormalises_within_covering_clients(weighting):
    rng = np.random.default_rng(4)
    rule = make_rule("hetlora", weighting=weighting, segment_average=True)
    global_ = trained_global(rng, rule)
    results = mixed_results(rng)
    new = rule.aggregate(global_, results)
    for name in SPEC.modules:
        p = sparsity_weights(results, weighting, name)
        a, b = new.lora[name]
        for j in range(R):
            covering = [k for k, r in enumerate(RANKS) if r > j]
            if not covering:  # j = 5: no client has rank 6, the previous global's component stays
                np.testing.assert_array_equal(a[j], global_.lora[name][0][j])
                np.testing.assert_array_equal(b[:, j], global_.lora[name][1][:, j])
                continue
            w = p[covering] / p[covering].sum()
            a_ref = sum(w_k * results[k].adapter.lora[name][0][j].astype(np.float64) for k, w_k in zip(covering, w))
            b_ref = sum(w_k * results[k].adapter.lora[name][1][:, j].astype(np.float64) for k, w_k in zip(covering, w))
            np.testing.assert_allclose(a[j], a_ref, atol=ATOL)
            np.testing.assert_allclose(b[:, j], b_ref, atol=ATOL)


def test_hetlora_client_view_is_top_r_truncation():
    rng = np.random.default_rng(5)
    rule = make_rule("hetlora")
    global_ = trained_global(rng, rule)
    view = rule.client_view(global_, 3)
    for name, (a, b) in global_.lora.items():
        np.testing.assert_array_equal(view.lora[name][0], a[:3])
        np.testing.assert_array_equal(view.lora[name][1], b[:, :3])
    assert view.meta["rank"] == 3
    np.testing.assert_array_equal(view.dense["head.weight"], global_.dense["head.weight"])


# ---------------------------------------------------------------- hlora


def test_hlora_equals_best_rank_r_approximation_of_dense_mean_update():
    rng = np.random.default_rng(6)
    rule = make_rule("hlora")
    global_ = trained_global(rng, rule)
    results = mixed_results(rng)
    new = rule.aggregate(global_, results)
    for name in SPEC.modules:
        reference = dense_mean([dense_update(*r.adapter.lora[name]) for r in results], N_SAMPLES)
        u, s, vt = np.linalg.svd(reference, full_matrices=False)
        keep = min(R, s.size)
        best = (u[:, :keep] * s[:keep]) @ vt[:keep]
        a, b = new.lora[name]
        np.testing.assert_allclose(dense_update(a, b), best, atol=1e-4)
        np.testing.assert_allclose(np.linalg.svd(dense_update(a, b), compute_uv=False)[:keep], s[:keep], rtol=1e-5)
        # Balanced split: ||B[:, j]|| = ||A[j]|| = sqrt(s_j).
        np.testing.assert_allclose(np.linalg.norm(b[:, :keep], axis=0), np.sqrt(s[:keep]), rtol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(a[:keep], axis=1), np.sqrt(s[:keep]), rtol=1e-5)


def test_hlora_components_beyond_the_update_rank_keep_previous_a_and_zero_b():
    rng = np.random.default_rng(7)
    rule = make_rule("hlora")
    global_ = trained_global(rng, rule)
    new = rule.aggregate(global_, mixed_results(rng))
    a, b = new.lora["wide"]  # out = 5 < R = 6: the 6th singular value is 0
    np.testing.assert_array_equal(a[5], global_.lora["wide"][0][5])
    assert not b[:, 5].any()


def test_hlora_zero_update_gives_zero_delta_and_trainable_a():
    rng = np.random.default_rng(8)
    rule = make_rule("hlora")
    global_ = rule.init_global(SPEC, R, seed=0)
    results = mixed_results(rng)
    for res in results:
        for _, b in res.adapter.lora.values():
            b[...] = 0.0
    new = rule.aggregate(global_, results)
    for name, (a, b) in new.lora.items():
        assert np.isfinite(a).all() and np.isfinite(b).all()
        assert not b.any()
        np.testing.assert_array_equal(a, global_.lora[name][0])


def test_hlora_client_view_is_best_rank_r_approximation():
    rng = np.random.default_rng(9)
    rule = make_rule("hlora")
    results = mixed_results(rng)
    new = rule.aggregate(trained_global(rng, rule), results)
    view = rule.client_view(new, 2)
    reference = dense_mean([dense_update(*r.adapter.lora["tall"]) for r in results], N_SAMPLES)
    u, s, vt = np.linalg.svd(reference)
    np.testing.assert_allclose(dense_update(*view.lora["tall"]), (u[:, :2] * s[:2]) @ vt[:2], atol=1e-4)


# ---------------------------------------------------------------- plora


def test_plora_plan_indices_is_reproducible_sorted_distinct_and_in_range():
    rule = make_rule("plora")
    args = dict(global_rank=16, rank=5, round_number=3, client_id="phone-1", seed=42)
    indices = plan_indices(rule, **args)
    assert indices == plan_indices(rule, **args)
    assert len(indices) == 5 and len(set(indices)) == 5 and list(indices) == sorted(indices)
    assert all(isinstance(j, int) and 0 <= j < 16 for j in indices)
    draws = {plan_indices(rule, **{**args, "client_id": f"phone-{k}"}) for k in range(20)}
    draws |= {plan_indices(rule, **{**args, "round_number": k}) for k in range(20)}
    assert len(draws) > 30  # different clients and rounds get different sets
    assert plan_indices(rule, **{**args, "rank": 16}) == tuple(range(16))


def test_plora_plan_indices_is_the_same_in_another_process():
    code = ("from hetlora.protocol.plan import Tier; from hetlora.protocol.settings import TrainingSettings; "
            "from hetlora.engine.aggregation import make_rule; print(make_rule('plora').configure(round_number=7, "
            "client_key='pi-4', tier=Tier(8), global_rank=64, seed=3, training=TrainingSettings()).indices)")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout  # str hashes differ from ours
    expected = str(plan_indices(make_rule("plora"), global_rank=64, rank=8, round_number=7, client_id="pi-4", seed=3))
    assert output == expected + "\n"


def test_plora_moves_each_index_by_the_round_mean_of_the_changes_with_zero_for_the_clients_that_skipped_it():
    rng = np.random.default_rng(10)
    rule = make_rule("plora")
    global_ = trained_global(rng, rule)
    indices = [(0, 4), (1, 2, 4), (4, 2, 0, 3, 1)]  # upload order need not be sorted; index 5: nobody
    results = [ClientResult(upload(rng, len(idx), f"c{k}"), n_k, idx)
               for k, (idx, n_k) in enumerate(zip(indices, N_SAMPLES))]
    new = rule.aggregate(global_, results)
    uploads = [(r.adapter, n_k, list(idx)) for r, n_k, idx in zip(results, N_SAMPLES, indices)]
    assert_matches_reference("plora", new, reference_global("plora", global_, uploads))
    for name in SPEC.modules:
        np.testing.assert_array_equal(new.lora[name][0][5], global_.lora[name][0][5])
        np.testing.assert_array_equal(new.lora[name][1][:, 5], global_.lora[name][1][:, 5])


def test_plora_with_every_client_at_full_rank_is_fedavg():
    rng = np.random.default_rng(15)
    global_ = trained_global(rng, make_rule("plora"))
    full = tuple(range(R))
    results = [ClientResult(upload(rng, R, f"c{k}"), n_k, full) for k, n_k in enumerate(N_SAMPLES)]
    plora, fedavg = make_rule("plora").aggregate(global_, results), make_rule("fedavg").aggregate(global_, results)
    for name in SPEC.modules:
        for x, y in zip(plora.lora[name], fedavg.lora[name]):
            np.testing.assert_allclose(x, y, atol=ATOL)


def test_plora_clients_on_disjoint_indices_move_the_global_by_the_mean_of_their_changes_not_the_sum():
    """Two clients each add the same change to their own half of the components: the product B A moves by
    half of what one client's change alone would add (a mean over each index's trainers would add all of it)."""
    rng = np.random.default_rng(16)
    rule = make_rule("plora")
    global_ = trained_global(rng, rule)
    halves = (tuple(range(0, R, 2)), tuple(range(1, R, 2)))
    delta_b = {name: rng.normal(size=(m.out_features, R)) for name, m in SPEC.modules.items()}
    results = []
    for k, idx in enumerate(halves):
        lora = {name: (np.asarray(a)[list(idx)].copy(), (np.asarray(b) + delta_b[name])[:, list(idx)].astype(np.float32))
                for name, (a, b) in global_.lora.items()}
        results.append(ClientResult(Adapter(lora=lora, dense=upload(rng, 1).dense, meta={"client_id": f"c{k}"}), 10, idx))
    new = rule.aggregate(global_, results)
    for name, (a, b) in global_.lora.items():
        expected = dense_update(a, b) + 0.5 * delta_b[name] @ np.asarray(a, np.float64)
        np.testing.assert_allclose(dense_update(*new.lora[name]), expected, atol=1e-3)


def test_plora_client_view_is_the_full_global():
    rule = make_rule("plora")
    global_ = trained_global(np.random.default_rng(11), rule)
    view = rule.client_view(global_, 2)
    for name, (a, b) in global_.lora.items():
        np.testing.assert_array_equal(view.lora[name][0], a)
        np.testing.assert_array_equal(view.lora[name][1], b)


# ---------------------------------------------------------------- fedavg


def test_fedavg_is_the_sample_weighted_mean_of_each_factor():
    rng = np.random.default_rng(12)
    rule = make_rule("fedavg")
    results = mixed_results(rng, ranks=(R, R, R))
    new = rule.aggregate(rule.init_global(SPEC, R, seed=0), results)
    for name in SPEC.modules:
        np.testing.assert_allclose(new.lora[name][0], dense_mean([r.adapter.lora[name][0] for r in results], N_SAMPLES),
                                   atol=ATOL)
        np.testing.assert_allclose(new.lora[name][1], dense_mean([r.adapter.lora[name][1] for r in results], N_SAMPLES),
                                   atol=ATOL)


def test_fedavg_rejects_mixed_ranks():
    rng = np.random.default_rng(13)
    rule = make_rule("fedavg")
    global_ = rule.init_global(SPEC, R, seed=0)
    with pytest.raises(ValueError, match="global rank 6"):
        rule.aggregate(global_, mixed_results(rng))
    with pytest.raises(ValueError, match="global rank 6"):
        rule.client_view(global_, 4)


# ---------------------------------------------------------------- every rule


def results_for(rule_name, rng):
    if rule_name == "fedavg":
        return mixed_results(rng, ranks=(R, R, R))
    if rule_name == "plora":
        rule = make_rule("plora")
        return [ClientResult(upload(rng, r, f"c{k}"), n_k,
                             plan_indices(rule, global_rank=R, rank=r, round_number=1, client_id=f"c{k}", seed=0))
                for k, (r, n_k) in enumerate(zip(RANKS, N_SAMPLES))]
    return mixed_results(rng)


@pytest.mark.parametrize("rule_name", RULES)
def test_dense_tensors_are_sample_weighted_means_and_inputs_are_not_mutated(rule_name):
    rng = np.random.default_rng(14)
    rule = make_rule(rule_name)
    global_ = trained_global(rng, rule)
    results = results_for(rule_name, rng)
    before = copy.deepcopy((global_, results))
    new = rule.aggregate(global_, results)
    for name in SPEC.dense:
        np.testing.assert_allclose(new.dense[name], dense_mean([r.adapter.dense[name] for r in results], N_SAMPLES),
                                   atol=ATOL)
        assert new.dense[name].dtype == np.float32
    assert new.rank == R and new.lora.keys() == global_.lora.keys()
    for (a0, b0), (a1, b1) in zip(before[0].lora.values(), global_.lora.values()):
        np.testing.assert_array_equal(a0, a1)
        np.testing.assert_array_equal(b0, b1)
    for r0, r1 in zip(before[1], results):
        for (a0, b0), (a1, b1) in zip(r0.adapter.lora.values(), r1.adapter.lora.values()):
            np.testing.assert_array_equal(a0, a1)
            np.testing.assert_array_equal(b0, b1)


@pytest.mark.parametrize("rule_name", RULES)
def test_init_global_is_deterministic_and_starts_at_zero_update(rule_name):
    rule = make_rule(rule_name)
    spec = AdapterSpec("h", "classification", ("q",), {"q": LoRAModule("q", 64, 32)},
                       {"head.weight": (80, 64), "head.bias": (80,)})
    first, again, other = (rule.init_global(spec, 8, seed) for seed in (0, 0, 1))
    a, b = first.lora["q"]
    assert a.shape == (8, 64) and b.shape == (32, 8) and a.dtype == np.float32
    assert not b.any() and np.abs(a).max() <= 1 / 8 and np.abs(a).max() > 0.1
    np.testing.assert_array_equal(a, again.lora["q"][0])
    assert not np.array_equal(a, other.lora["q"][0])
    assert not first.dense["head.bias"].any()
    assert first.dense["head.weight"].std() == pytest.approx(0.02, rel=0.05)


def test_client_view_does_not_alias_the_global():
    rule = make_rule("plora")
    global_ = trained_global(np.random.default_rng(15), rule)
    view = rule.client_view(global_, R)
    view.lora["tall"][1][...] = 7.0
    view.dense["head.bias"][...] = 7.0
    assert not (global_.lora["tall"][1] == 7.0).any() and not (global_.dense["head.bias"] == 7.0).any()


def test_aggregate_statistics_reports_clients_weights_and_factored_norms():
    rng = np.random.default_rng(16)
    rule = make_rule("hlora")
    results = mixed_results(rng)
    new = rule.aggregate(trained_global(rng, rule), results)
    stats = aggregate_statistics(new, results)
    assert stats["clients"] == 3 and stats["ranks"] == list(RANKS) and stats["total_samples"] == 100
    assert stats["sample_weights"] == pytest.approx([0.1, 0.3, 0.6])
    assert stats["global_rank"] == R
    norms = [np.sqrt(sum(np.linalg.norm(dense_update(*f)) ** 2 for f in r.adapter.lora.values())) for r in results]
    assert stats["update_norms"] == pytest.approx(norms, rel=1e-5)
    mean_norm = np.mean([np.linalg.norm(dense_update(a, b)) for a, b in new.lora.values()])
    assert stats["mean_delta_norm"] == pytest.approx(mean_norm, rel=1e-5)


# ---------------------------------------------------------------- errors


def test_make_rule_names_valid_rules_and_options():
    with pytest.raises(ValueError, match="fedavg, hetlora, hlora, plora"):
        make_rule("flexlora")
    with pytest.raises(ValueError, match="valid options: weighting, segment_average"):
        make_rule("hetlora", segment=True)
    with pytest.raises(ValueError, match="valid options: none"):
        make_rule("hlora", weighting="n")
    with pytest.raises(ValueError, match="sparsity"):
        make_rule("hetlora", weighting="norm")


def with_lora(result, name, a, b):
    lora = {**result.adapter.lora, name: (a, b)}
    return ClientResult(Adapter(lora, result.adapter.dense, result.adapter.meta), result.n_samples, result.indices)


def bad_inputs(rng):
    good = mixed_results(rng)
    a, b = good[0].adapter.lora["tall"]
    extra = dict(good[0].adapter.lora, extra=(a, b))
    missing_dense = {"head.weight": good[0].adapter.dense["head.weight"]}
    return {
        "no client results": [],
        "n_samples must be a positive integer": [ClientResult(good[0].adapter, 0)],
        "LoRA modules do not match": [ClientResult(Adapter(extra, good[0].adapter.dense), 5)],
        "dense tensors do not match": [ClientResult(Adapter(good[0].adapter.lora, missing_dense), 5)],
        "outside 1..6": [mixed_results(rng, ranks=(7,), n=(5,))[0]],
        "expected \\(r, 16\\)": [with_lora(good[0], "tall", a[:, :4], b)],
        "different ranks": [with_lora(good[0], "tall", a[:1], b[:, :1])],
        "NaN or Inf": [with_lora(good[0], "tall", np.full_like(a, np.nan), b)],
    }


@pytest.mark.parametrize("rule_name", ["hetlora", "hlora", "plora"])
def test_bad_inputs_raise_clear_value_errors(rule_name):
    rng = np.random.default_rng(17)
    rule = make_rule(rule_name)
    global_ = rule.init_global(SPEC, R, seed=0)
    for message, results in bad_inputs(rng).items():
        if rule_name == "plora":
            results = [ClientResult(r.adapter, r.n_samples, tuple(range(min(len(r.adapter.lora["wide"][0]), R)))) for r in results]
        with pytest.raises(ValueError, match=message):
            rule.aggregate(global_, results)


@pytest.mark.parametrize("indices, message", [
    (None, "has no indices"), ((0, 6), "integers in 0..5"), ((1, 1), "duplicates"), ((0, 1, 2), "but 3 indices"),
    ((-1, 2), "integers in 0..5"),
])
def test_plora_rejects_bad_indices(indices, message):
    rng = np.random.default_rng(18)
    rule = make_rule("plora")
    with pytest.raises(ValueError, match=message):
        rule.aggregate(rule.init_global(SPEC, R, seed=0), [ClientResult(upload(rng, 2), 5, indices)])


def test_rank_arguments_are_checked():
    rule = make_rule("hetlora")
    global_ = rule.init_global(SPEC, R, seed=0)
    with pytest.raises(ValueError, match="exceeds the global rank 6"):
        rule.client_view(global_, 7)
    with pytest.raises(ValueError, match="positive integer"):
        rule.init_global(SPEC, 0, seed=0)
    with pytest.raises(ValueError, match="exceeds the global rank 4"):
        plan_indices(make_rule("plora"), global_rank=4, rank=5, round_number=0, client_id="x", seed=0)
