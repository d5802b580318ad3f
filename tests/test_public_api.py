"""The public surface, pinned: what `import jhvp` offers, and that nothing else leaks."""

import types

import jhvp
from jhvp import compat


def test_jhvp_all_is_pinned():
    assert sorted(jhvp.__all__) == [
        "Batches",
        "FisherOperator",
        "GGNOperator",
        "HessianOperator",
        "Operator",
        "ScipyObjective",
        "StreamedOperator",
        "batches",
        "empirical_fisher_operator",
        "ggn_operator",
        "hessian_operator",
        "hvp",
        "scipy_objective",
        "to_lineax",
        "to_scipy",
        "value_grad_hvp",
        "vhp",
    ]


def test_every_public_name_exists_and_nothing_else_leaks():
    for name in jhvp.__all__:
        assert hasattr(jhvp, name), name
    public = {n for n in vars(jhvp) if not n.startswith("_")}
    submodules = {n for n in public if isinstance(getattr(jhvp, n), types.ModuleType)}
    assert public - submodules == set(jhvp.__all__)
    # Subpackages a user imports by name; no stray modules (`version`, `PackageNotFoundError`).
    assert submodules <= {"compat", "curvature", "interop"}
    assert isinstance(jhvp.__version__, str)


def test_compat_all_in_torch_order():
    assert compat.__all__ == ["vjp", "jvp", "jacobian", "hessian", "hvp", "vhp"]
    assert {n for n in vars(compat) if not n.startswith("_")} - set(compat.__all__) <= set()


def test_public_functions_have_docstrings_with_examples():
    for name in jhvp.__all__:
        doc = getattr(jhvp, name).__doc__ or ""
        assert "Examples:" in doc and ">>>" in doc, name


def test_version_has_one_source_and_a_changelog_entry():
    import importlib.metadata
    import importlib.resources
    import pathlib
    import re

    assert jhvp.__version__ == importlib.metadata.version("jhvp")
    changelog = pathlib.Path(__file__).resolve().parent.parent / "CHANGELOG.md"
    released = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", changelog.read_text(),
                          re.MULTILINE)
    assert released and released[0] == jhvp.__version__, released
    # The wheel says its types are checked (PEP 561).
    assert importlib.resources.files("jhvp").joinpath("py.typed").is_file()


def test_returned_types_are_importable_where_the_docs_say():
    import jax.numpy as jnp

    from jhvp import curvature, interop

    f = lambda w: jnp.sum(jnp.tanh(w) ** 2)
    w = jnp.linspace(-1.0, 1.0, 4)
    assert isinstance(jhvp.hessian_operator(f, (w,)), jhvp.HessianOperator)
    assert isinstance(jhvp.ggn_operator(jnp.tanh, lambda z: jnp.sum(z ** 2), (w,)),
                      jhvp.GGNOperator)
    assert isinstance(jhvp.empirical_fisher_operator(jnp.tanh, (w,)), jhvp.FisherOperator)
    assert isinstance(jhvp.batches(w, batch_size=2), jhvp.Batches)
    assert isinstance(jhvp.scipy_objective(f, (w,), dtype=jnp.float32), jhvp.ScipyObjective)
    assert jhvp.ScipyObjective is interop.ScipyObjective
    assert set(interop.__all__) <= set(vars(interop))
    for name in curvature.__all__:
        assert getattr(curvature, name).__module__.startswith("jhvp.curvature"), name
