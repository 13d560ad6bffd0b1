"""``--model-file`` as users write code (issue 25): a model file imports the modules beside it, and an exception of
the user's own code (the file or a sibling, at import, in the factory, in a forward during an attack) is one line
naming their FILE:LINE, exit 2, while an exception of the suite itself stays "unexpected ... (a bug", exit 1.

Each test writes its model file and sibling modules into ``tmp_path`` under names no other test uses: sibling
modules stay in ``sys.modules`` by design (:mod:`models.model_file`), so the ``siblings`` fixture drops them after.
"""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

import models.model_file as model_file
from models.model_file import build_from_spec, user_code_frame
from robustness.app import cli
from robustness.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
#: A plain classifier on [0, 1] images, for a helper module beside the model file.
NET = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes, image_size):
        super().__init__()
        self.fc = nn.Linear(3 * image_size * image_size, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))
"""
FAST = ["--dataset", "synthetic", "--attacks", "fgsm", "--eps", "8/255", "--n", "8", "--device", "cpu",
        "--no-progress"]


@pytest.fixture
def siblings():
    """Names of sibling modules a test writes; they are dropped from ``sys.modules`` afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        sys.modules.pop(name, None)


def _write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).write_text(textwrap.dedent(text))


def _line(path: Path, marker: str) -> int:
    """The number of the line of ``path`` that holds ``marker``."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if marker in line)


def _weights(tmp_path: Path, spec: str) -> Path:
    """A state dict for ``spec`` on the CLI's synthetic data (16 classes of 32 x 32 images)."""
    weights = tmp_path / "w.pt"
    model = build_from_spec(spec, derived={"num_classes": 16, "image_size": 32})
    torch.save(model.net.state_dict(), weights)
    return weights


def test_a_model_file_imports_the_modules_beside_it_and_leaves_sys_path_as_it_was(tmp_path, siblings):
    siblings += ["helper_mod", "helper_widths"]
    _write(tmp_path, {"helper_mod.py": NET, "helper_widths.py": "SIZE = 8\n", "nets.py": """
        from helper_mod import Net


        def build(num_classes):
            from helper_widths import SIZE  # imported while the factory runs

            return Net(num_classes, SIZE)
        """})
    path_before = list(sys.path)
    model = build_from_spec(f"{tmp_path / 'nets.py'}:build", derived={"num_classes": 5, "unused": 1})
    assert type(model.net).__module__ == "helper_mod"
    assert sys.path == path_before and str(tmp_path) not in sys.path
    logits = model.net(torch.rand(4, 3, 8, 8))
    assert logits.shape == (4, 5) and torch.isfinite(logits).all()
    # a second build (a checkpoint rebuilding the model) finds the siblings again
    again = build_from_spec(f"{tmp_path / 'nets.py'}:build", derived={"num_classes": 5})
    again.net.load_state_dict(model.net.state_dict())
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(again.net(x), model.net(x)) and sys.path == path_before


def test_a_forward_raising_in_the_users_file_is_their_one_line_error_exit_2(tmp_path, siblings, monkeypatch,
                                                                             capsys):
    siblings.append("fwd_helper")
    nets = tmp_path / "nets.py"
    _write(tmp_path, {"fwd_helper.py": NET, "nets.py": """
        import torch
        from fwd_helper import Net


        class Heads(Net):
            def forward(self, x):
                if torch.is_grad_enabled() and x.requires_grad:  # only while an attack crafts
                    return [self.fc][len(self.fc.bias)](x.flatten(1))  # the user's bug
                return super().forward(x)


        def build(num_classes, image_size):
            return Heads(num_classes, image_size)
        """})
    line = _line(nets, "the user's bug")
    weights = _weights(tmp_path, f"{nets}:build")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    code = cli.main(["attack", str(tmp_path / "run"), "--model-file", f"{nets}:build", "--weights", str(weights),
                     *FAST])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("dsn-robust attack: error: your model raised IndexError: list index out of range at "
                          f"{nets}:{line} ("), err
    assert "a bug" not in err and "unexpected" not in err
    saved = next((tmp_path / "cache" / "dsn-robust").glob("crash-*.txt"))
    assert str(saved) in err and "run_evaluation" in saved.read_text()  # raised during the attack, not the build


def test_a_factory_or_import_failure_of_the_users_code_names_their_file_and_line(tmp_path, siblings):
    siblings += ["factory_helper", "import_helper", "models_helper_user"]
    _write(tmp_path, {
        "factory_helper.py": """
            def make(num_classes):
                return {}["layers"]  # fails in the factory
            """,
        "factory.py": """
            def build(num_classes):
                from factory_helper import make

                return make(num_classes)
            """,
        "syntax.py": "import torch\n\ndef build(:\n    pass\n",
        "import_helper.py": """
            WIDTHS = [4, 8]
            DEFAULT = WIDTHS[2]  # fails at import
            """,
        "imports.py": "from import_helper import DEFAULT\n",
        "models.py": "class SkipNet:\n    pass\n",  # SkipNet's layout: loses to the suite's package models
        "shadowed.py": "from models import SkipNet\n",
    })
    cases = [
        ("factory.py", f"model factory {tmp_path / 'factory.py'}:build failed: KeyError: 'layers' at "
                       f"{tmp_path / 'factory_helper.py'}:{_line(tmp_path / 'factory_helper.py', 'in the factory')}"),
        ("syntax.py", f"model file {tmp_path / 'syntax.py'} failed to import: SyntaxError: "),
        ("imports.py", f"model file {tmp_path / 'imports.py'} failed to import: IndexError: list index out of range at "
                       f"{tmp_path / 'import_helper.py'}:{_line(tmp_path / 'import_helper.py', 'at import')}"),
        ("shadowed.py", f"model file {tmp_path / 'shadowed.py'} failed to import: ImportError: cannot import name "
                        f"'SkipNet' from 'models'"),
    ]
    for name, start in cases:
        with pytest.raises(ConfigError) as err:
            build_from_spec(f"{tmp_path / name}:build", derived={"num_classes": 3})
        text = str(err.value)
        assert "\n" not in text and text.startswith(start), text
    assert str(err.value).endswith(f"at {tmp_path / 'shadowed.py'}:1 (the suite's package models shadows your "
                                   f"models.py: rename that module)")
    with pytest.raises(ConfigError) as err:
        build_from_spec(f"{tmp_path / 'syntax.py'}:build")
    assert str(err.value).endswith(f" at {tmp_path / 'syntax.py'}:3")
    assert str(tmp_path) not in sys.path


def test_an_exception_of_the_suite_itself_stays_a_bug_exit_1(tmp_path, siblings, monkeypatch, capsys):
    import robustness.app.api

    siblings.append("bug_helper")
    nets = tmp_path / "nets.py"
    _write(tmp_path, {"bug_helper.py": NET, "nets.py": """
        from bug_helper import Net


        def build(num_classes, image_size):
            return Net(num_classes, image_size)
        """})
    weights = _weights(tmp_path, f"{nets}:build")

    def broken_evaluation(model, data, *args, **kwargs):
        model(data.batch(slice(0, 2))[0])  # the user's forward runs (and returns) first
        return [][0]  # then the suite fails
    monkeypatch.setattr(robustness.app.api, "run_evaluation", broken_evaluation)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    code = cli.main(["attack", str(tmp_path / "run"), "--model-file", f"{nets}:build", "--weights", str(weights),
                     *FAST])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("dsn-robust attack: error: unexpected IndexError: list index out of range (a bug; "), err
    assert "your model" not in err and len(err.strip().splitlines()) == 1


def test_installed_code_below_the_users_folder_is_not_theirs(monkeypatch):
    """A model file in the project's root: the suite's packages and the virtual environment (torch) lie below its
    folder, yet the line blamed is the user's call into them, not the line of the suite or torch that raised."""
    monkeypatch.setattr(model_file, "_USER_FOLDERS", {REPO})
    user_file = REPO / "my_nets_not_on_disk.py"
    code = compile("import torch\nfrom robustness.core.vocab import parse_eps\n\n"
                   "def suite():\n    parse_eps('lots')\n\n"
                   "def torch_call():\n    torch.nn.Linear(2, 2)(torch.zeros(3))\n", str(user_file), "exec")
    namespace: dict = {}
    exec(code, namespace)
    for call, line in ((namespace["suite"], 5), (namespace["torch_call"], 8)):
        with pytest.raises(Exception) as err:
            call()
        assert user_code_frame(err.value) == (str(user_file), line)
    monkeypatch.setattr(model_file, "_USER_FOLDERS", set())
    assert user_code_frame(err.value) is None  # no model file loaded: nothing is the user's
