"""Installed packages extend padkd through the `padkd.plugins` entry-point group."""

from __future__ import annotations

import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from padkd import plugins
from padkd.cli import main


def _fake_entry_points(tmp_path: Path, body: str, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fake_padkd_plugin.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fake_padkd_plugin", raising=False)
    ep = EntryPoint(name="fake", value="fake_padkd_plugin", group=plugins.GROUP)
    monkeypatch.setattr(plugins, "entry_points", lambda group: [ep] if group == plugins.GROUP else [])


def test_a_plugin_method_is_listed_and_usable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    _fake_entry_points(tmp_path, '''
from padkd.methods import METHODS, Method

@METHODS.register("cosine_hint")
class CosineHint(Method):
    """1 - cosine similarity of pooled embeddings, per sample."""
    def forward(self, student, teacher, batch):
        import torch.nn.functional as F
        return 1 - F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1)
''', monkeypatch)
    try:
        assert main(["list", "methods"]) == 0
        assert "cosine_hint" in capsys.readouterr().out
    finally:
        from padkd.methods import METHODS

        METHODS._entries.pop("cosine_hint", None)


def test_a_broken_plugin_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    _fake_entry_points(tmp_path, "raise ImportError('missing dependency foo')\n", monkeypatch)
    assert main(["list", "methods"]) == 2
    err = capsys.readouterr().err
    assert "plugin 'fake'" in err and "missing dependency foo" in err and "Traceback" not in err
