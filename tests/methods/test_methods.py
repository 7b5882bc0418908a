"""Merge methods: each checked element-wise against a plain reference formula (tests/helpers/reference.py) and,
where mergekit 0.1.5 is installed, against its in-memory API ``mergekit.merge_methods.merge_tensors``."""

from __future__ import annotations

import copy

import pytest
import torch

from mergealign.errors import MergeAlignError
from mergealign.methods import (
    METHODS,
    MethodParams,
    TensorContext,
    get_method,
    list_methods,
    resolve_coefficients,
    resolve_lambdas,
)
from mergealign.methods import base as methods_base
from mergealign.methods.base import CHUNK_ELEMENTS
from mergealign.methods.dare import dare_mask
from mergealign.methods.selection import kth_largest_abs
from tests.helpers import reference as ref

# Kernels work in chunks; tests lower the chunk size so that the last shape spans several chunks (the last one
# partial). test_default_chunk_size_on_a_large_tensor runs the real size once.
TEST_CHUNK = 4096
SHAPES = [(37,), (16, 9), (3, 4, 5), (300, 41)]
SMALL_SHAPES = SHAPES[:3]
LARGE = (CHUNK_ELEMENTS // 1000 + 7, 1000)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # the tensors here are small; one intra-op thread avoids waiting on a busy second core
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(methods_base, "CHUNK_ELEMENTS", TEST_CHUNK)
    monkeypatch.setattr(methods_base, "THREADED_CHUNK_FACTOR", 1)


def make_inputs(shape, n=3, seed=0, zero_frac=0.1):
    """base, fine-tuned weights θ_t and task vectors τ_t; τ_t has exact zeros (untouched weights), and a whole
    leading slice of τ_0 is zero."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    taus = []
    for i in range(n):
        tau = torch.randn(shape, generator=g) * 0.02
        tau[torch.rand(shape, generator=g) < zero_frac] = 0.0
        if i == 0:
            tau.reshape(-1)[: max(1, tau.numel() // 10)] = 0.0
        taus.append(tau)
    thetas = [base + t for t in taus]
    return base, thetas, taus


def ctx(models, globals_=None, name="model.layers.0.mlp.up_proj.weight", seed=0):
    return TensorContext(name=name, model=models, globals=globals_ or {}, seed=seed)


def run(method, models, globals_, base, tensors, **kw):
    m = get_method(method)
    out = m.merge(ctx(models, globals_, **kw), base, tensors)
    assert out.dtype == torch.float32 and out.shape == tensors[0].shape
    return out


def close(out, expected, atol=2e-6):
    torch.testing.assert_close(out.double(), expected.double(), atol=atol, rtol=1e-5)


@pytest.fixture(scope="module")
def mk():
    return pytest.importorskip("mergekit.merge_methods", reason="mergekit (the peer tool) is not installed")


# --------------------------------------------------------------------------- registry
def test_registry_lists_every_method_and_suggests_close_names():
    assert {
        "mergealign",
        "linear",
        "task_arithmetic",
        "slerp",
        "slerp_vectors",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
    } <= set(METHODS)
    assert [n for n, _ in list_methods()] == sorted(METHODS)
    with pytest.raises(MergeAlignError, match="did you mean 'ties'"):
        get_method("tie")
    with pytest.raises(MergeAlignError, match="'dare_linear'"):
        get_method("dare_lienar")
    assert get_method("ties") is not get_method("ties")  # fresh instances: TIES keeps whole-model state


# --------------------------------------------------------------------------- elementwise methods
@pytest.mark.parametrize("shape", SHAPES)
def test_task_arithmetic_matches_reference(shape):
    base, _, taus = make_inputs(shape)
    w = [0.3, -0.5, 1.2]
    for g in ({}, {"lambda": 0.7}, {"lambda": 0.7, "normalize": True}):
        out = run("task_arithmetic", [{"weight": x} for x in w], g, base, taus)
        close(out, ref.task_arithmetic(base, taus, w, g.get("lambda", 1.0), g.get("normalize", False)))


@pytest.mark.parametrize("shape", SMALL_SHAPES)
def test_linear_matches_reference(shape):
    _, thetas, _ = make_inputs(shape)
    w = [1.0, 2.0, 0.5]
    close(run("linear", [{"weight": x} for x in w], {}, None, thetas), ref.linear(thetas, w))
    close(
        run("linear", [{"weight": x} for x in w], {"normalize": False}, None, thetas),
        ref.linear(thetas, w, normalize=False),
    )
    with pytest.raises(MergeAlignError, match="sum to 0"):
        run("linear", [{"weight": 1.0}, {"weight": -1.0}], {}, None, thetas[:2])


@pytest.mark.parametrize("shape", SHAPES)
def test_mergealign_presets(shape):
    base, (expert, aligned, _), (tau_d, tau_a, _) = make_inputs(shape)
    roles = [{"role": "domain"}, {"role": "alignment"}]
    close(run("mergealign", roles, {"lambda": 1.0}, base, [tau_d, tau_a]), expert, atol=1e-6)
    close(run("mergealign", roles, {"lambda": 0.0}, base, [tau_d, tau_a]), aligned, atol=1e-6)
    close(
        run("mergealign", roles, {"preset": "sum"}, base, [tau_d, tau_a]),
        ref.d(expert) + ref.d(aligned) - ref.d(base),
    )
    # default interp λ = 0.5 is the midpoint of the two models
    close(run("mergealign", roles, {}, base, [tau_d, tau_a]), (ref.d(expert) + ref.d(aligned)) / 2)
    # explicit overrides and per-model weights
    out = run(
        "mergealign",
        [{"role": "alignment", "weight": 2.0}, {"role": "domain"}],
        {"lambda": 0.3, "lambda_alignment": 0.25},
        base,
        [tau_a, tau_d],
    )
    close(out, ref.d(base) + 0.3 * ref.d(tau_d) + 0.5 * ref.d(tau_a))


def test_mergealign_coefficients_several_domain_models():
    assert resolve_lambdas({}) == (0.5, 0.5)
    assert resolve_lambdas({"preset": "sum"}) == (1.0, 1.0)
    assert resolve_lambdas({"lambda": 0.2}) == (0.2, 0.8)
    assert resolve_lambdas({"preset": "sum", "lambda_domain": 0.5}) == (0.5, 1.0)
    assert resolve_coefficients({"lambda": 0.2}, ["domain", "alignment", "domain"], [1.0, 1.0, 3.0]) == [
        pytest.approx(0.2),
        pytest.approx(0.8),
        pytest.approx(0.6),
    ]
    base, _, taus = make_inputs((8, 6))
    models = [{"role": "domain"}, {"role": "alignment"}, {"role": "domain", "weight": 3.0}]
    out = run("mergealign", models, {"lambda": 0.2}, base, taus)
    close(out, ref.task_arithmetic(base, taus, [0.2, 0.8, 0.6]))


def test_elementwise_methods_give_the_same_result_per_row_block():
    base, thetas, taus = make_inputs((40, 7))
    cases = [
        ("task_arithmetic", [{"weight": 0.5}] * 3, {"lambda": 0.9}, base, taus),
        ("mergealign", [{"role": "domain"}, {"role": "alignment"}, {"role": "domain"}], {}, base, taus),
        ("linear", [{"weight": 1.0}, {"weight": 3.0}, {"weight": 2.0}], {}, None, thetas),
    ]
    for name, models, g, b, ts in cases:
        m = get_method(name)
        assert m.elementwise
        whole = m.merge(ctx(models, g), b, ts)
        parts = [
            m.merge(ctx(models, g), None if b is None else b[r], [t[r] for t in ts])
            for r in (slice(0, 13), slice(13, 40))
        ]
        assert torch.equal(whole, torch.cat(parts))


# --------------------------------------------------------------------------- slerp
@pytest.mark.parametrize("shape", SMALL_SHAPES)
def test_slerp_matches_reference_and_base_is_t0(shape):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    for t in (0.0, 0.3, 1.0):
        close(run("slerp", [{}], {"t": t}, a, [b]), ref.slerp(a, b, t))  # base = the t=0 end
        close(run("slerp", [{}, {}], {"t": t}, None, [a, b]), ref.slerp(a, b, t))
    # nearly colinear (fine-tunes of one base): linear interpolation
    b2 = a + 0.01 * b
    out = run("slerp", [{}], {"t": 0.25}, a, [b2])
    close(out, 0.75 * ref.d(a) + 0.25 * ref.d(b2))


def test_slerp_vectors_matches_reference():
    base, _, taus = make_inputs((33, 10))
    for g, models, t in (({"t": 0.3}, [{}, {}], 0.3), ({}, [{"weight": 1.0}, {"weight": 3.0}], 0.75)):
        out = run("slerp_vectors", models, g, base, taus[:2])
        close(out, ref.d(base) + ref.slerp(taus[0], taus[1], t))
    colinear = run("slerp_vectors", [{}, {}], {"t": 0.4}, base, [taus[0], 2.0 * taus[0]])
    close(colinear, ref.d(base) + 0.6 * ref.d(taus[0]) + 0.8 * ref.d(taus[0]))


# --------------------------------------------------------------------------- top-k selection
def test_kth_largest_abs_equals_kthvalue():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5 * TEST_CHUNK + 123, generator=g)
    x[::7] = 0.0
    x[1::11] = 0.5  # many ties
    x[2::13] = -0.5
    n = x.numel()
    ks = [1, 2, n // 5, n // 2, n - 1, n]
    expected = [float(torch.kthvalue(x.abs(), n - k + 1).values) for k in ks]
    assert kth_largest_abs(x, ks) == expected


def _observe_model(method, tensors_by_name, models, g):
    passes = method.observe_passes(g)
    assert passes == 2
    for p in range(passes):
        for name, tensors in tensors_by_name.items():
            method.observe(TensorContext(name, model=models, globals=g, observe_pass=p), None, tensors)


def test_whole_model_topk_threshold_equals_kthvalue_over_concatenation():
    shapes = [(300, 40), (TEST_CHUNK // 100 + 3, 100), (77,), (5, 6, 7)]
    per_tensor = {f"t{i}": make_inputs(s, n=2, seed=10 + i)[2] for i, s in enumerate(shapes)}
    models = [{"density": 0.2}, {"density": 0.05}]
    g = {"topk_scope": "model"}
    m = get_method("ties")
    _observe_model(m, per_tensor, models, g)
    thresholds = m.model_thresholds()
    for i, dens in enumerate((0.2, 0.05)):
        cat = torch.cat([taus[i].reshape(-1) for taus in per_tensor.values()]).abs()
        k = max(1, int(dens * cat.numel()))
        assert thresholds[i] == float(torch.kthvalue(cat, cat.numel() - k + 1).values)
    # merging a tensor trims with the model-wide thresholds
    base = torch.randn(5, 6, 7)
    taus = per_tensor["t3"]
    out = m.merge(ctx(models, g), base, taus)
    kept = [ref.trim(t, 1.0, thr) for t, thr in zip(taus, thresholds, strict=True)]
    close(out, ref.ties_merge(base, kept, [1.0, 1.0]))
    # restoring saved thresholds skips the observe passes (resume)
    m2 = get_method("ties")
    m2.set_model_thresholds(thresholds)
    assert m2.observe_passes(g) == 0
    assert torch.equal(m2.merge(ctx(models, g), base, taus), out)
    with pytest.raises(MergeAlignError, match="observe"):
        get_method("ties").merge(ctx(models, g), base, taus)


# --------------------------------------------------------------------------- TIES
TIES_OPTIONS = [
    {},  # mergekit convention
    {"weights_in_election": "after"},
    {"merge_func": "sum"},
    {"normalize": False, "weights_in_election": "after"},
    {"zero_sign": "majority"},
    {"rescale": True, "lambda": 0.8},
]


TIES_CASES = [(s, o) for s in SHAPES for o in TIES_OPTIONS]


@pytest.mark.parametrize(("shape", "opts"), TIES_CASES)
def test_ties_matches_reference(shape, opts):
    base, _, taus = make_inputs(shape)
    w = [0.2, 0.5, 0.3]
    dens = [0.3, 0.5, 1.0]
    models = [{"weight": x, "density": y} for x, y in zip(w, dens, strict=True)]
    out = run("ties", models, opts, base, taus)
    kept = [ref.trim(t, y) for t, y in zip(taus, dens, strict=True)]
    if opts.get("rescale"):
        kept = [ref.l1_rescaled(t, k) for t, k in zip(taus, kept, strict=True)]
    mean = opts.get("merge_func", "mean") == "mean" and opts.get("normalize", True)
    expected = ref.ties_merge(
        base,
        kept,
        w,
        before=opts.get("weights_in_election", "before") == "before",
        mean=mean,
        zero_sign=opts.get("zero_sign", "positive"),
        lam=opts.get("lambda", 1.0),
    )
    close(out, expected)


@pytest.mark.parametrize("opts", [{}, {"weights_in_election": "after"}, {"merge_func": "sum"}])
def test_ties_mixed_sign_weights_match_reference(opts):
    # negative weights flip votes before the election; a weight sum of exactly 0 over the agreeing set divides by 1
    base, _, taus = make_inputs((300, 41))
    taus[2] = taus[1].clone()
    w = [0.7, -0.4, 0.4]
    models = [{"weight": x, "density": 0.6} for x in w]
    kept = [ref.trim(t, 0.6) for t in taus]
    expected = ref.ties_merge(
        base,
        kept,
        w,
        before=opts.get("weights_in_election", "before") == "before",
        mean=opts.get("merge_func", "mean") == "mean",
    )
    close(run("ties", models, opts, base, taus), expected)


def test_ties_model_scope_needs_one_density_per_model():
    m = get_method("ties")
    g = {"topk_scope": "model"}
    m.observe(TensorContext("a", model=[{"density": 0.2}], globals=g), None, [torch.randn(10)])
    with pytest.raises(MergeAlignError, match=r"models\[0\]\.parameters\.density is 0.3 here but 0.2"):
        m.observe(TensorContext("b", model=[{"density": 0.3}], globals=g), None, [torch.randn(10)])


def test_ties_zero_sign_conventions_differ_where_entries_cancel():
    base = torch.zeros(6)
    a = torch.tensor([1.0, -1.0, 2.0, 0.0, 3.0, 4.0])
    b = torch.tensor([-1.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    models = [{}, {}]
    pos = run("ties", models, {}, base, [a, b])
    maj = run("ties", models, {"zero_sign": "majority"}, base, [a, b])
    # exact cancellation: mergekit takes the positive entry; the overall majority here is positive too
    assert pos.tolist() == [1.0, 1.0, 1.5, 0.0, 2.0, 2.5] == maj.tolist()
    neg = run("ties", models, {"zero_sign": "majority"}, base, [-a, -b])
    assert neg.tolist() == [-1.0, -1.0, -1.5, 0.0, -2.0, -2.5]
    assert run("ties", models, {}, base, [-a, -b]).tolist()[:2] == [1.0, 1.0]


def test_ties_paper_convention_defaults():
    m = get_method("ties")
    g = m.resolved_globals({"convention": "paper"})
    assert (g["topk_scope"], g["weights_in_election"], g["merge_func"], g["zero_sign"]) == (
        "model",
        "after",
        "mean",
        "majority",
    )
    assert m.default_model("density", {"convention": "paper"}) == 0.2
    g = m.resolved_globals({})
    assert (g["topk_scope"], g["weights_in_election"], g["merge_func"], g["normalize"]) == (
        "tensor",
        "before",
        "mean",
        True,
    )
    assert m.observe_passes({"convention": "paper"}) == 2 and m.observe_passes({}) == 0


# --------------------------------------------------------------------------- DARE
def test_dare_masks_are_reproducible_per_seed_and_tensor_name():
    like = torch.zeros(3 * TEST_CHUNK + 999)
    c = ctx([{}], name="a.weight", seed=7)
    m1 = dare_mask(c, 0, like, 0.3)
    assert torch.equal(m1, dare_mask(ctx([{}], name="a.weight", seed=7), 0, like, 0.3))
    assert not torch.equal(m1, dare_mask(ctx([{}], name="b.weight", seed=7), 0, like, 0.3))
    assert not torch.equal(m1, dare_mask(ctx([{}], name="a.weight", seed=8), 0, like, 0.3))
    assert not torch.equal(m1, dare_mask(c, 1, like, 0.3))  # each model has its own stream
    with pytest.MonkeyPatch.context() as mp:  # on CPU the draws do not depend on the chunk size
        mp.setattr(methods_base, "CHUNK_ELEMENTS", 1000)
        assert torch.equal(m1, dare_mask(c, 0, like, 0.3))
    frac = m1.double().mean().item()
    assert abs(frac - 0.3) < 5 * (0.3 * 0.7 / like.numel()) ** 0.5
    # the merge itself is reproducible, independent of other tensors merged before
    base, _, taus = make_inputs((50, 20))
    models = [{"density": 0.4}, {"density": 0.6}, {"density": 0.5}]
    first = run("dare_ties", models, {}, base, taus, name="x", seed=1)
    run("dare_ties", models, {}, base, taus, name="other", seed=1)
    assert torch.equal(first, run("dare_ties", models, {}, base, taus, name="x", seed=1))
    assert not torch.equal(first, run("dare_ties", models, {}, base, taus, name="y", seed=1))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["inverse", "l1", "none"])
def test_dare_linear_matches_reference(shape, mode):
    base, _, taus = make_inputs(shape)
    w, dens = [0.5, 1.5, -0.4], [0.3, 0.9, 1.0]
    models = [{"weight": x, "density": y} for x, y in zip(w, dens, strict=True)]
    c = ctx(models, {"rescale_mode": mode, "lambda": 0.6}, seed=5)
    out = get_method("dare_linear").merge(c, base, taus)
    dropped = []
    for i, (t, y) in enumerate(zip(taus, dens, strict=True)):
        if y >= 1:
            dropped.append(ref.d(t))
            continue
        kept = torch.where(dare_mask(c, i, t, y), ref.d(t), 0.0)
        dropped.append({"inverse": kept / y, "l1": ref.l1_rescaled(t, kept), "none": kept}[mode])
    close(out, ref.task_arithmetic(base, dropped, w, lam=0.6))


@pytest.mark.parametrize("shape", SMALL_SHAPES)
@pytest.mark.parametrize("opts", [{}, {"convention": "paper"}, {"rescale": True, "normalize": True}])
def test_dare_ties_matches_reference(shape, opts):
    base, _, taus = make_inputs(shape)
    w, dens = [0.7, 0.4, 1.0], [0.5, 0.8, 0.6]
    models = [{"weight": x, "density": y} for x, y in zip(w, dens, strict=True)]
    c = ctx(models, opts, seed=3)
    out = get_method("dare_ties").merge(c, base, taus)
    dropped = []
    for i, (t, y) in enumerate(zip(taus, dens, strict=True)):
        kept = torch.where(dare_mask(c, i, t, y), ref.d(t), 0.0)
        dropped.append(ref.l1_rescaled(t, kept) if opts.get("rescale") else kept / y)
    paper = opts.get("convention") == "paper"
    expected = ref.ties_merge(
        base,
        dropped,
        w,
        before=not paper,
        mean=paper or opts.get("normalize", False),
        zero_sign="majority" if paper else "positive",
    )
    close(out, expected)


# --------------------------------------------------------------------------- breadcrumbs
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_breadcrumbs_matches_reference(shape, granularity):
    base, _, taus = make_inputs(shape)
    w = [1.0, 0.5, 2.0]
    params = [(0.3, 0.05), (0.8, 0.3), (0.1, 0.01)]  # density + gamma > 1 in the middle one
    models = [{"weight": x, "density": y, "gamma": z} for x, (y, z) in zip(w, params, strict=True)]
    out = run("breadcrumbs", models, {"granularity": granularity, "lambda": 0.5}, base, taus)
    kept = [
        ref.d(t) * ref.breadcrumbs_mask(t, y, z, per_row=granularity == "row")
        for t, (y, z) in zip(taus, params, strict=True)
    ]
    close(out, ref.task_arithmetic(base, kept, w, lam=0.5))


# --------------------------------------------------------------------------- inputs untouched
@pytest.mark.parametrize("name", sorted(METHODS))
def test_inputs_are_not_modified(name):
    base, thetas, taus = make_inputs((20, 11))
    method = get_method(name)
    tensors = thetas if not method.uses_deltas else taus
    tensors = tensors[:2]
    models = [{"role": "domain"}, {"role": "alignment"}] if name == "mergealign" else [{}, {}]
    for mdl in models:
        if "density" in method.model_params:
            mdl["density"] = 0.5
    g = {"t": 0.4} if name == "slerp" else {}
    b = None if name in ("linear", "slerp") else base
    before = [t.clone() for t in tensors], base.clone()
    method.merge(ctx(models, g), b, tensors)
    assert all(torch.equal(x, y) for x, y in zip(before[0], tensors, strict=True)) and torch.equal(
        before[1], base
    )


@pytest.mark.parametrize("name", ["ties", "dare_ties"])
@pytest.mark.parametrize(
    "opts", [{}, {"weights_in_election": "after", "zero_sign": "majority"}, {"rescale": True}]
)
def test_result_over_disposable_inputs_and_a_stored_dtype_base_is_bit_identical(name, opts):
    # What the engine does for whole-tensor methods: the base stays in its file's dtype (bf16 here) and the
    # result is written over the first task vector. Several chunks, so a chunk written early must not be read.
    base, _, taus = make_inputs((300, 41))
    base16 = base.to(torch.bfloat16)
    models = [
        {"weight": 0.7, "density": 0.5},
        {"weight": 0.4, "density": 0.3},
        {"weight": 1.0, "density": 0.8},
    ]
    method = get_method(name)
    expected = method.merge(ctx(models, opts), base16.float(), taus)
    disposable = [t.clone() for t in taus]
    c = TensorContext(name="model.layers.0.mlp.up_proj.weight", model=models, globals=opts,
                      inputs_disposable=True)  # fmt: skip
    out = method.merge(c, base16, disposable)
    assert out.data_ptr() == disposable[0].data_ptr()  # no new whole-tensor buffer
    assert torch.equal(out, expected)


# --------------------------------------------------------------------------- validation
def test_validate_names_the_field():
    ma = get_method("mergealign")
    models = [{"role": "domain"}, {"role": "alignment"}]
    assert ma.validate(MethodParams(globals={"lambda": 0.4}, models=models)) == []
    problems = ma.validate(MethodParams(globals={"lambda": 1.5}, models=models))
    assert problems == ["parameters.lambda: must be in [0, 1], got 1.5"]
    assert any("role 'alignment'" in p for p in ma.validate(MethodParams(models=[{"role": "domain"}] * 2)))
    assert any(
        "models[1].parameters.role" in p
        for p in ma.validate(MethodParams(models=[{"role": "domain"}, {"role": "aligned"}]))
    )
    assert any(
        "no effect with preset 'sum'" in p
        for p in ma.validate(MethodParams(globals={"preset": "sum", "lambda": 0.5}, models=models))
    )
    assert any("requires a base model" in p for p in ma.validate(MethodParams(models=models, has_base=False)))

    ties = get_method("ties")
    problems = ties.validate(MethodParams(models=[{"density": 0.5}, {"density": 1.5}]))
    assert problems == ["models[1].parameters.density: must be in (0, 1], got 1.5"]
    problems = ties.validate(MethodParams(models=[{"density": 0.0}], model_labels=["expert"]))
    assert problems == ["expert.parameters.density: must be in (0, 1], got 0.0"]
    # layer gradients and filters are checked value by value
    problems = ties.validate(MethodParams(models=[{"density": [0.2, 0.5, 2.0]}]))
    assert problems == ["models[0].parameters.density[2]: must be in (0, 1], got 2.0"]
    problems = ties.validate(
        MethodParams(models=[{"density": [{"filter": "mlp", "value": -1}, {"value": 0.5}]}])
    )
    assert problems == ["models[0].parameters.density[0].value: must be in (0, 1], got -1"]
    problems = ties.validate(MethodParams(globals={"topk_scop": "model"}, models=[{}]))
    assert len(problems) == 1 and "did you mean 'topk_scope'" in problems[0]
    assert ties.validate(MethodParams(globals={"normalize": True, "merge_func": "sum"}, models=[{}]))[
        0
    ].startswith("parameters.normalize")
    assert ties.validate(MethodParams(globals={"weights_in_election": "during"}, models=[{}])) == [
        "parameters.weights_in_election: must be one of 'before', 'after', got 'during'"
    ]

    assert (
        get_method("dare_linear")
        .validate(MethodParams(globals={"rescale": True, "rescale_mode": "inverse"}, models=[{}]))[0]
        .startswith("parameters.rescale")
    )
    slerp = get_method("slerp")
    assert slerp.validate(MethodParams(globals={"t": 0.5}, models=[{}])) == []
    assert any(
        "slerp_vectors" in p for p in slerp.validate(MethodParams(globals={"t": 0.5}, models=[{}, {}]))
    )
    assert slerp.validate(MethodParams(models=[{}])) == ["parameters.t: required by method 'slerp'"]
    assert slerp.validate(MethodParams(globals={"t": True}, models=[{}])) == [
        "parameters.t: must be a number, got True"
    ]


# --------------------------------------------------------------------------- mergekit parity
def _mk(mk, tensors, method, params, base_index=0):
    return mk.merge_tensors([t.clone() for t in tensors], method, base_index=base_index, parameters=params)


@pytest.mark.parametrize("shape", [(37,), (24, 16)])
def test_mergekit_parity_deterministic_methods(mk, shape):
    base, thetas, taus = make_inputs(shape)
    w = [0.2, 0.5, 0.3]
    wm = [{"weight": x} for x in w]
    close(
        run("task_arithmetic", wm, {"lambda": 0.8}, base, taus),
        _mk(mk, [base, *thetas], "task_arithmetic", {"weight": w, "lambda": 0.8}),
        atol=1e-6,
    )
    close(run("linear", wm, {}, None, thetas), _mk(mk, thetas, "linear", {"weight": w}, None), atol=1e-6)
    for ww in ([1.0, 1.0, 1.0], w, [0.7, -0.4, 0.5]):
        for dens in (1.0, 0.3):
            models = [{"weight": x, "density": dens} for x in ww]
            for g in ({}, {"normalize": False}):
                close(
                    run("ties", models, g, base, taus),
                    _mk(mk, [base, *thetas], "ties", {"weight": ww, "density": dens, **g}),
                    atol=1e-6,
                )
    g = torch.Generator().manual_seed(9)
    other = torch.randn(shape, generator=g)
    close(
        run("slerp", [{}], {"t": 0.35}, base, [other]),
        _mk(mk, [base, other], "slerp", {"t": 0.35}),
        atol=1e-6,
    )
    close(
        run("slerp", [{}], {"t": 0.35}, base, [thetas[0]]),  # colinear -> lerp in both
        _mk(mk, [base, thetas[0]], "slerp", {"t": 0.35}),
        atol=1e-6,
    )
    close(
        run("slerp_vectors", [{"weight": 1.0}, {"weight": 2.0}], {}, base, taus[:2]),
        _mk(mk, [base, *thetas[:2]], "nuslerp", {"weight": [1.0, 2.0]}),
        atol=1e-6,
    )
    bc = [{"weight": x, "density": 0.4, "gamma": 0.05} for x in w]
    close(
        run("breadcrumbs", bc, {}, base, taus),
        _mk(mk, [base, *thetas], "breadcrumbs", {"weight": w, "density": 0.4, "gamma": 0.05}),
        atol=1e-6,
    )
    # DARE with density 1 is deterministic: identical to mergekit
    for method in ("dare_linear", "dare_ties"):
        close(
            run(method, [{"weight": x, "density": 1.0} for x in w], {}, base, taus),
            _mk(mk, [base, *thetas], method, {"weight": w, "density": 1.0}),
            atol=1e-6,
        )


def test_mergekit_parity_dare_statistics(mk):
    _, _, taus = make_inputs((400, 250), n=1, zero_frac=0.0)
    base, thetas = torch.zeros_like(taus[0]), taus  # a zero base keeps θ − θ_0 exact in float32
    tau = ref.d(taus[0])
    nonzero = tau != 0  # make_inputs zeroes a leading slice of the first task vector
    n = int(nonzero.sum())
    density = 0.3
    theirs = ref.d(_mk(mk, [base, thetas[0]], "dare_linear", {"weight": [1.0], "density": density})) - ref.d(
        base
    )
    ours_l1 = ref.d(run("dare_linear", [{"density": density}], {"rescale_mode": "l1"}, base, taus)) - ref.d(
        base
    )
    ours_inv = ref.d(run("dare_linear", [{"density": density}], {}, base, taus)) - ref.d(base)
    tol = 5 * (density * (1 - density) / n) ** 0.5
    for delta in (theirs, ours_l1, ours_inv):
        kept = delta != 0
        assert abs(kept[nonzero].double().mean().item() - density) < tol
        scale = delta[kept] / tau[kept]
        assert torch.allclose(scale, scale[0].expand_as(scale), rtol=1e-4)  # one factor per tensor
        assert abs(scale[0].item() * density - 1) < 0.02
    # mergekit and rescale_mode l1 both keep the L1 norm exactly; inverse scales by exactly 1/density
    for delta in (theirs, ours_l1):
        assert delta.abs().sum().item() == pytest.approx(tau.abs().sum().item(), rel=1e-5)
    kept = ours_inv != 0
    torch.testing.assert_close(ours_inv[kept], tau[kept] / density, rtol=1e-6, atol=0)


def test_default_chunk_size_on_a_large_tensor(monkeypatch):
    monkeypatch.setattr(methods_base, "CHUNK_ELEMENTS", CHUNK_ELEMENTS)  # the real default
    monkeypatch.setattr(methods_base, "THREADED_CHUNK_FACTOR", 1)
    base, _, taus = make_inputs(LARGE, n=2)
    assert taus[0].numel() > methods_base.chunk_elements()
    w, dens = [0.6, 0.4], [0.2, 0.5]
    models = [{"weight": x, "density": y} for x, y in zip(w, dens, strict=True)]
    kept = [ref.trim(t, y) for t, y in zip(taus, dens, strict=True)]
    close(run("ties", models, {}, base, taus), ref.ties_merge(base, kept, w))
    close(run("task_arithmetic", models[:1] * 2, {}, base, taus), ref.task_arithmetic(base, taus, [0.6, 0.6]))


def test_contexts_are_copy_safe():
    # frozen context; copies give the same generator stream
    c = ctx([{"density": 0.5}], seed=4)
    a = torch.rand(5, generator=c.generator())
    b = torch.rand(5, generator=copy.deepcopy(c).generator())
    assert torch.equal(a, b)
    with pytest.raises(AttributeError):
        c.name = "x"  # type: ignore[misc]
