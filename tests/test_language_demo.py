"""The language demo's parts that need no training: every run config parses, students differ only where they
should, and the report table's paired differences and intervals are those computed here by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from padkd.config import parse_config
from padkd.demos import language


def test_every_demo_config_parses_and_only_the_terms_differ(tmp_path: Path) -> None:
    parse_config(language.teacher_config(tmp_path, quick=False))
    configs = {m: language.student_config(m, 0, tmp_path, quick=False) for m in language.TERMS}
    for cfg in configs.values():
        parse_config(cfg)
    strip = [{k: v for k, v in stage.items() if k != "terms"} for stage in configs["alone"]["stages"]]
    for method, cfg in configs.items():
        assert [{k: v for k, v in s.items() if k != "terms"} for s in cfg["stages"]] == strip, method
    # PAD and its control share stage 1 and differ in stage 2 by the weighting alone
    fkl, pad = configs["forward_kl"]["stages"], configs["pad"]["stages"]
    assert fkl[0]["terms"] == pad[0]["terms"]
    assert {k: v for k, v in pad[1]["terms"][0].items() if k not in ("weighting", "embedding")} == fkl[1]["terms"][0]


def test_summary_table_gives_paired_differences_with_t_intervals() -> None:
    results = {"methods": ["forward_kl", "pad"], "labels": {"forward_kl": "control", "pad": "PAD"},
               "baseline": "forward_kl", "seeds": [0, 1, 2],
               "teacher_test": {"perplexity": 3.0, "bpb": 1.5},
               "test": {"forward_kl": {"0": {"perplexity": 5.0, "bpb": 2.0}, "1": {"perplexity": 6.0, "bpb": 2.1},
                                       "2": {"perplexity": 7.0, "bpb": 2.2}},
                        "pad": {"0": {"perplexity": 4.0, "bpb": 2.0}, "1": {"perplexity": 5.0, "bpb": 2.0},
                                "2": {"perplexity": 7.0, "bpb": 2.1}}}}
    table = language.summary_table(results)
    # differences -1, -1, 0: mean -2/3, sd sqrt(1/3), t(0.975, 2) = 4.302653
    half = 4.302653 * math.sqrt(1 / 3) / math.sqrt(3)
    row = next(line for line in table.splitlines() if line.startswith("| PAD"))
    assert f"{-2 / 3:+.4f} [{-2 / 3 - half:+.4f}, {-2 / 3 + half:+.4f}]" in row
    assert "5.3333 ± 1.5275" in row
    assert "| teacher | 3.0000 | 1.5000 |" in table
    with pytest.raises(KeyError):
        language.summary_table(results | {"methods": ["missing"]})
