"""GGNOperator and FisherOperator: equal the dense formulas, PSD, the operator protocol, curvlinops."""

import gc
import weakref

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import DTYPE, X64, rand, random_like, tree_allclose
from jax.flatten_util import ravel_pytree

import jhvp

N, D, HIDDEN, C = 6, 3, 5, 4


def mlp(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
    return h @ params["w2"] + params["b2"][None, :]


def mlp_params(seed=0):
    return {"w1": rand(seed, (D, HIDDEN), 0.7), "b1": rand(seed + 1, (HIDDEN,), 0.1),
            "w2": rand(seed + 2, (HIDDEN, C), 0.7), "b2": rand(seed + 3, (C,), 0.1)}


def mse(z, y):
    return jnp.mean((z - y) ** 2)


def log_softmax(z):
    shifted = z - jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    return shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))


def cross_entropy(z, labels):
    return -jnp.mean(jnp.take_along_axis(log_softmax(z), labels[:, None], axis=-1))


def data(seed=10):
    x = rand(seed, (N, D))
    labels = jax.random.randint(jax.random.PRNGKey(seed + 1), (N,), 0, C)
    return x, {"mse": rand(seed + 2, (N, C)), "ce": labels}


LOSSES = {"mse": mse, "ce": cross_entropy}


def dense_ggn(model, loss, primals, loss_args=()):
    """Jᵀ H_ℓ J with J = jax.jacobian of the model (argnums=0, ravelled) and H_ℓ = jax.hessian."""
    flat, unravel = ravel_pytree(primals[0])
    z = model(*primals)
    z_flat, unravel_z = ravel_pytree(z)
    J = jax.jacobian(lambda p: ravel_pytree(model(unravel(p), *primals[1:]))[0])(flat)
    H = jax.hessian(lambda u: loss(unravel_z(u), *loss_args))(z_flat)
    return J.T @ H @ J


def dense_fisher(losses, primals):
    flat, unravel = ravel_pytree(primals[0])
    J = jax.jacobian(lambda p: losses(unravel(p), *primals[1:]))(flat)
    return J.T @ J / J.shape[0]


def per_example_ce(params, x, labels):
    return -jnp.take_along_axis(log_softmax(mlp(params, x)), labels[:, None], axis=-1)[:, 0]


def _psd_tol(G):
    return (1e-10 if X64 else 1e-5) * float(np.linalg.norm(np.asarray(G), 2))


def _rtol(scale=1.0):
    return dict(rtol=1e-9 * scale, atol=1e-11 * scale) if X64 else dict(rtol=1e-4, atol=1e-5)


# ---- values against the dense formulas ----------------------------------------------------------


@pytest.mark.parametrize("name", ["mse", "ce"])
def test_ggn_equals_dense_jt_h_j(name):
    params, (x, targets) = mlp_params(), data()
    loss, y = LOSSES[name], targets[name]
    op = jhvp.ggn_operator(mlp, loss, (params, x), loss_args=(y,))
    G = dense_ggn(mlp, loss, (params, x), (y,))
    tree_allclose(op.as_matrix(), G, **_rtol())
    v = random_like(params, 3)
    _, unravel = ravel_pytree(params)
    tree_allclose(op(v), unravel(G @ ravel_pytree(v)[0]), **_rtol())
    composed = lambda p: loss(mlp(p, x), y)  # noqa: E731
    tree_allclose(op.value, composed(params))
    tree_allclose(op.grad, jax.grad(composed)(params))
    assert op.shape == (G.shape[0], G.shape[0])
    assert jax.tree.structure(op.in_structure()) == jax.tree.structure(params)
    assert repr(op).startswith(f"GGNOperator(n={G.shape[0]}, value=")
    assert op.T is op and op.transpose() is op


def test_ggn_equinox_mlp_as_primal():
    model = eqx.nn.MLP(D, C, HIDDEN, 2, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    model = jax.tree.map(lambda a: a.astype(DTYPE) if eqx.is_inexact_array(a) else a, model)
    x, targets = data()
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def apply(m, x):
        return jax.vmap(m)(x)

    op = jhvp.ggn_operator(apply, cross_entropy, (model, x), loss_args=(targets["ce"],))
    G = dense_ggn(lambda p, x: apply(eqx.combine(p, static), x), cross_entropy, (params, x),
                  (targets["ce"],))
    tree_allclose(op.as_matrix(), G, **_rtol())
    assert jax.tree.structure(op.grad) == jax.tree.structure(params)
    v = jax.tree.map(jnp.ones_like, params)
    full = eqx.combine(v, static)  # the model's own structure, statics repeated, is accepted too
    tree_allclose(op(full), op(v))


def test_ggn_is_the_hessian_for_a_linear_model_with_mse():
    x, y = rand(0, (N, D)), rand(1, (N,))
    w = rand(2, (D,))
    model = lambda w, x: x @ w  # noqa: E731
    op = jhvp.ggn_operator(model, mse, (w, x), loss_args=(y,))
    hessian = jhvp.hessian_operator(lambda w, x, y: mse(model(w, x), y), (w, x, y))
    tree_allclose(op.as_matrix(), hessian.as_matrix(), **_rtol(10))
    tree_allclose(op.as_matrix(), 2.0 * x.T @ x / N, **_rtol(10))


def test_argnums_and_tuple_argnums():
    params, (x, targets) = mlp_params(), data()
    y = targets["mse"]
    swapped = lambda x, p: mlp(p, x)  # noqa: E731
    op1 = jhvp.ggn_operator(swapped, mse, (x, params), argnums=1, loss_args=(y,))
    tree_allclose(op1.as_matrix(), dense_ggn(mlp, mse, (params, x), (y,)), **_rtol())
    op2 = jhvp.ggn_operator(mlp, mse, (params, x), argnums=(0, 1), loss_args=(y,))
    v = random_like((params, x), 4)
    flat, unravel = ravel_pytree((params, x))
    J = jax.jacobian(lambda u: mlp(*unravel(u)).reshape(-1))(flat)
    H = jax.hessian(lambda z: mse(z.reshape(N, C), y))(mlp(params, x).reshape(-1))
    tree_allclose(op2(v), unravel(J.T @ H @ J @ ravel_pytree(v)[0]), **_rtol())


@pytest.mark.parametrize("name", ["mse", "ce"])
def test_ggn_and_fisher_are_psd(name):
    params, (x, targets) = mlp_params(1), data(20)
    ggn = jhvp.ggn_operator(mlp, LOSSES[name], (params, x), loss_args=(targets[name],))
    fisher = jhvp.empirical_fisher_operator(per_example_ce, (params, x, targets["ce"]))
    for op in (ggn, fisher):
        A = np.asarray(op.as_matrix())
        assert np.linalg.eigvalsh((A + A.T) / 2).min() >= -_psd_tol(A)
        assert type(op).psd is True
    assert getattr(jhvp.HessianOperator, "psd", False) is False


def test_fisher_equals_dense_jt_j_over_n():
    params, (x, targets) = mlp_params(), data()
    labels = targets["ce"]
    op = jhvp.empirical_fisher_operator(per_example_ce, (params, x, labels))
    F = dense_fisher(per_example_ce, (params, x, labels))
    tree_allclose(op.as_matrix(), F, **_rtol())
    v = random_like(params, 5)
    _, unravel = ravel_pytree(params)
    tree_allclose(op @ v, unravel(F @ ravel_pytree(v)[0]), **_rtol())
    mean_loss = lambda p: jnp.mean(per_example_ce(p, x, labels))  # noqa: E731
    tree_allclose(op.value, mean_loss(params))
    tree_allclose(op.grad, jax.grad(mean_loss)(params))
    assert repr(op).startswith("FisherOperator(n=")


# ---- the operator protocol ----------------------------------------------------------------------


def _operators():
    params, (x, targets) = mlp_params(), data()
    return (jhvp.ggn_operator(mlp, cross_entropy, (params, x), loss_args=(targets["ce"],)),
            jhvp.empirical_fisher_operator(per_example_ce, (params, x, targets["ce"])))


@pytest.mark.parametrize("which", [0, 1])
def test_vmap_over_tangents_and_jit_with_operator_argument(which):
    op = _operators()[which]
    vs = [random_like(op.grad, s) for s in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *vs)
    expected = jax.tree.map(lambda *a: jnp.stack(a), *[op(v) for v in vs])
    tree_allclose(jax.vmap(op)(stacked), expected)
    apply = jax.jit(lambda op, v: op @ v)
    tree_allclose(apply(op, vs[0]), op(vs[0]))
    closed = jax.make_jaxpr(lambda op, v: op @ v)(op, vs[0])
    assert closed.consts == []  # the residuals are arguments, not baked-in constants
    assert len(jax.tree.leaves(op)) > len(jax.tree.leaves(op.grad)) + 1


@pytest.mark.parametrize("which", [0, 1])
def test_curvature_eigh_and_solve_agree_with_numpy(which):
    op = _operators()[which]
    A = np.asarray(op.as_matrix(), dtype=np.float64)
    top = np.linalg.eigvalsh((A + A.T) / 2)[::-1][:2]
    result = jhvp.curvature.eigh(op, jax.random.PRNGKey(0), k=2)
    np.testing.assert_allclose(np.asarray(result.eigenvalues), top, rtol=1e-6 if X64 else 1e-3)
    b = random_like(op.grad, 7)
    damping = 0.5
    sol = jhvp.curvature.solve(op, b, damping=damping, rtol=1e-10 if X64 else 1e-6)
    x_ref = np.linalg.solve(A + damping * np.eye(A.shape[0]), np.asarray(ravel_pytree(b)[0]))
    np.testing.assert_allclose(np.asarray(ravel_pytree(sol.x)[0]), x_ref,
                               rtol=1e-7 if X64 else 1e-3, atol=1e-9 if X64 else 1e-4)


@pytest.mark.parametrize("which", [0, 1])
def test_the_other_curvature_functions_take_them(which):
    op, key, c = _operators()[which], jax.random.PRNGKey(1), jhvp.curvature
    A = np.asarray(op.as_matrix(), dtype=np.float64)
    n = A.shape[0]
    tol = dict(rtol=1e-8 if X64 else 1e-4, atol=1e-10 if X64 else 1e-5)
    exact = c.diagonal_exact(op).estimate
    np.testing.assert_allclose(np.asarray(ravel_pytree(exact)[0]), np.diag(A), **tol)
    power = c.power_iteration(op, key, max_iters=500, rtol=1e-6)
    np.testing.assert_allclose(float(power.eigenvalues[0]), np.linalg.eigvalsh(A)[-1],
                               rtol=1e-3)
    estimate = c.trace(op, key, num_matvecs=3 * (n // 3)).estimate  # hutch++: a multiple of 3
    assert np.isfinite(float(estimate))
    assert np.all(np.isfinite(np.asarray(c.spectral_density(op, key).density)))
    assert np.all(np.isfinite(np.asarray(c.lanczos(op, op.grad, 5).alphas)))


@pytest.mark.parametrize("which", [0, 1])
def test_to_lineax_is_psd_tagged(which):
    lx = pytest.importorskip("lineax", reason="lineax is an optional dependency")
    A = jhvp.to_lineax(_operators()[which])
    assert lx.is_symmetric(A) and lx.is_positive_semidefinite(A)


def test_built_inside_jit_for_a_gauss_newton_step():
    params, (x, targets) = mlp_params(), data()
    y = targets["mse"]

    @jax.jit
    def step(p):
        op = jhvp.ggn_operator(mlp, mse, (p, x), loss_args=(y,))
        return jhvp.curvature.solve(op, op.grad, damping=1.0, rtol=1e-10 if X64 else 1e-6).x

    G = np.asarray(dense_ggn(mlp, mse, (params, x), (y,)), dtype=np.float64)
    g = np.asarray(ravel_pytree(jax.grad(lambda p: mse(mlp(p, x), y))(params))[0])
    expected = np.linalg.solve(G + np.eye(G.shape[0]), g)
    np.testing.assert_allclose(np.asarray(ravel_pytree(step(params))[0]), expected,
                               rtol=1e-7 if X64 else 2e-3, atol=1e-9 if X64 else 1e-4)


def test_compiled_once_and_loss_args_are_traced():
    traces = []

    def model(p, x):
        traces.append(1)
        return mlp(p, x)

    params, (x, targets) = mlp_params(), data()
    y = targets["mse"]
    first = jhvp.ggn_operator(model, mse, (params, x), loss_args=(y,))
    count = len(traces)
    second = jhvp.ggn_operator(model, mse, (params, x), loss_args=(2.0 * y,))
    assert len(traces) == count  # new targets: the same program
    tree_allclose(second.value, mse(mlp(params, x), 2.0 * y))
    assert not np.allclose(np.asarray(first.value), np.asarray(second.value))


def test_operators_outlive_model_and_loss_without_keeping_them_alive():
    x = jnp.arange(3.0, dtype=DTYPE)
    model = lambda w: jnp.sin(w) * 2.0  # noqa: E731
    loss = lambda z: 0.5 * jnp.sum(z**2)  # noqa: E731
    losses = lambda w: jnp.sin(w)  # noqa: E731
    refs = [weakref.ref(fn) for fn in (model, loss, losses)]
    ggn = jhvp.ggn_operator(model, loss, (x,))
    fisher = jhvp.empirical_fisher_operator(losses, (x,))
    del model, loss, losses
    gc.collect()
    assert all(ref() is None for ref in refs)
    v = jnp.ones(3, DTYPE)
    tree_allclose(ggn(v), 4.0 * jnp.cos(x) ** 2)  # J = diag(2 cos w), ∇²L = I
    tree_allclose(fisher(v), jnp.cos(x) ** 2 / 3.0)  # J = diag(cos w), N = 3


# ---- errors -------------------------------------------------------------------------------------


def test_errors_name_the_api_and_the_fix():
    params, (x, targets) = mlp_params(), data()
    y = targets["mse"]
    with pytest.raises(TypeError, match=r"jhvp.ggn_operator: `loss\(model\(\*primals\), "
                                        r"\*loss_args\)` must return a real scalar, got an array "
                                        r"of shape \(6, 4\)"):
        jhvp.ggn_operator(mlp, lambda z, y: (z - y) ** 2, (params, x), loss_args=(y,))
    with pytest.raises(TypeError, match=r"jhvp.ggn_operator: `model` must be callable"):
        jhvp.ggn_operator(params, mse, (params, x), loss_args=(y,))
    with pytest.raises(TypeError, match=r"jhvp.ggn_operator: `loss_args` must be a tuple"):
        jhvp.ggn_operator(mlp, mse, (params, x), loss_args=y)
    with pytest.raises(TypeError, match=r"jhvp.ggn_operator: `primals` must be a tuple"):
        jhvp.ggn_operator(mlp, mse, params)
    with pytest.raises(TypeError, match=r"jhvp.ggn_operator: the model's outputs must be real "
                                        r"floating point, but output\[1\] has dtype int32"):
        jhvp.ggn_operator(lambda p, x: (mlp(p, x), jnp.argmax(x, axis=-1).astype(jnp.int32)),
                          lambda z, y: mse(z[0], y), (params, x), loss_args=(y,))
    with pytest.raises(TypeError, match=r"jhvp.empirical_fisher_operator: `per_example_loss` "
                                        r"must return a 1-D floating-point vector.*shape \(\)"):
        jhvp.empirical_fisher_operator(lambda p, x, y: mse(mlp(p, x), y), (params, x, y))
    with pytest.raises(TypeError, match=r"jhvp.empirical_fisher_operator: .*shape \(6, 4\)"):
        jhvp.empirical_fisher_operator(lambda p, x, y: (mlp(p, x) - y) ** 2, (params, x, y))
    with pytest.raises(ValueError, match=r"jhvp.ggn_operator: argnums=2 is out of range"):
        jhvp.ggn_operator(mlp, mse, (params, x), argnums=2, loss_args=(y,))
    with pytest.raises(TypeError, match=r"jhvp.empirical_fisher_operator: differentiated "
                                        r"primals must have floating-point leaves"):
        jhvp.empirical_fisher_operator(lambda n: jnp.ones(3, DTYPE) * n, (jnp.ones(3, jnp.int32),))


@pytest.mark.parametrize("which", [0, 1])
def test_wrong_tangent_names_the_operator(which):
    op = _operators()[which]
    bad = dict(random_like(op.grad, 0), w1=jnp.ones((D + 1, HIDDEN), DTYPE))
    name = type(op).__name__
    with pytest.raises(ValueError, match=rf"jhvp.{name}: `tangents` leaf tangents\['w1'\] has "
                                         rf"shape \(4, 5\)"):
        op(bad)


# ---- against curvlinops (PyTorch) ---------------------------------------------------------------


# torch's forward-mode AD scripts its decompositions on first use (torch/_decomp), which warns.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", ["mse", "ce"])
def test_ggn_matches_curvlinops(name):
    torch = pytest.importorskip("torch", reason="torch is needed for the curvlinops cross-check")
    curvlinops = pytest.importorskip("curvlinops", reason="curvlinops-for-pytorch not installed")
    if not X64:
        pytest.skip("the curvlinops cross-check compares to 1e-10 and needs JAX_ENABLE_X64=1")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(D, HIDDEN), torch.nn.Tanh(),
                              torch.nn.Linear(HIDDEN, C)).double()
    X = torch.randn(N, D, dtype=torch.float64)
    if name == "mse":
        y = torch.randn(N, C, dtype=torch.float64)
        loss_func = torch.nn.MSELoss(reduction="mean")  # mean over all N·C entries, like `mse`
    else:
        y = torch.randint(0, C, (N,))
        loss_func = torch.nn.CrossEntropyLoss()  # mean over N
    params = [p for p in net.parameters() if p.requires_grad]
    ggn = curvlinops.GGNLinearOperator(net, loss_func, params, [(X, y)])
    n = sum(p.numel() for p in params)
    expected = (ggn @ torch.eye(n, dtype=torch.float64)).detach().numpy()

    def model(p, x):  # torch's Linear: x @ W.T + b; parameters in torch's order
        w1, b1, w2, b2 = p
        return jnp.tanh(x @ w1.T + b1[None, :]) @ w2.T + b2[None, :]

    jparams = [jnp.asarray(p.detach().numpy()) for p in params]
    target = jnp.asarray(y.numpy())
    op = jhvp.ggn_operator(model, LOSSES[name], (jparams, jnp.asarray(X.numpy())),
                           loss_args=(target,))
    G = np.asarray(op.as_matrix())
    np.testing.assert_allclose(G, expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())
    tree_allclose(op.value, jnp.asarray(loss_func(net(X), y).item()))
