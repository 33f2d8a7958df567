"""Every public function documents itself with an example, and every example runs."""

import doctest
import importlib
import inspect
import pkgutil

import pytest

import jaxcompress

# make_digits is the offline script that built the embedded data; it needs scikit-learn.
_SCRIPTS = {"jaxcompress.examples.data.make_digits"}
_MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(jaxcompress.__path__, prefix="jaxcompress.")
    if info.name not in _SCRIPTS
)


@pytest.mark.parametrize("module_name", ["jaxcompress", *_MODULES])
def test_examples_run(module_name):
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest failures in {module_name}"


def _public_callables():
    for name in jaxcompress.__all__:
        obj = getattr(jaxcompress, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            yield name, obj
    for name in jaxcompress.training.__all__:
        yield f"training.{name}", getattr(jaxcompress.training, name)
    for name in dir(jaxcompress.filters):
        obj = getattr(jaxcompress.filters, name)
        if (
            inspect.isfunction(obj)
            and obj.__module__ == "jaxcompress.transforms.filters"
            and not name.startswith("_")
        ):
            yield f"filters.{name}", obj


@pytest.mark.parametrize(("name", "obj"), list(_public_callables()))
def test_public_api_has_google_style_docstring_with_example(name, obj):
    doc = inspect.getdoc(obj) or ""
    assert ">>>" in doc, f"{name} has no runnable example"
    if inspect.isfunction(obj) and inspect.signature(obj).parameters:
        assert "Args:" in doc or "Example" in doc, f"{name} has no Args: section"
