"""The README's quickstart snippets are where the install test looks for them.

The install test (``tests/system/test_install.py``, slow) applies them to a fresh
project; these checks catch a lost marker or a snippet that cannot even compile in
seconds, before the slow test builds anything.
"""

import pytest

from tests.support import readme


@pytest.mark.parametrize("name", sorted(readme.SNIPPETS))
def test_every_snippet_the_install_test_applies_is_marked(name):
    assert readme.snippet(name).strip()


@pytest.mark.parametrize(
    "name", sorted(n for n, lang in readme.SNIPPETS.items() if lang == "python")
)
def test_python_snippets_compile(name):
    compile(readme.snippet(name), f"README.md:install:{name}", "exec")


def test_the_setup_steps_are_manage_py_commands():
    for argv in readme.commands("setup"):
        assert argv[:2] == ["python", "manage.py"], argv


def test_the_pip_line_installs_the_package_with_extras():
    (argv,) = readme.commands("pip")
    assert any(arg.startswith("django-llm-quota[") for arg in argv), argv


def test_a_quoted_argument_may_span_lines():
    text = (
        "<!-- install:setup -->\n```sh\npython manage.py migrate  # tables\n"
        'python manage.py shell -c "print(\n    1)"\n```\n'
    )
    assert readme.commands("setup", text) == [
        ["python", "manage.py", "migrate"],
        ["python", "manage.py", "shell", "-c", "print(\n    1)"],
    ]


def test_a_missing_marker_fails_with_its_name():
    text = "<!-- install:pip -->\n```sh\npip install django-llm-quota\n```\n"
    with pytest.raises(AssertionError, match="install:views"):
        readme.snippet("views", text)


def test_a_marker_without_its_block_fails():
    text = "<!-- install:views -->\nsome prose, no fence\n"
    with pytest.raises(AssertionError, match="no fenced block follows"):
        readme.snippets(text)
