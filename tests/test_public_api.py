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
