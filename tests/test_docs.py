"""The documentation stays true: every key and metric is documented, with its default."""

from __future__ import annotations

import dataclasses
import re
import tomllib

from sidecar.config import Config
from sidecar.metrics import Metrics
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def config_keys() -> dict[str, object]:
    return {
        f"{name}.{f.name}": getattr(section, f.name)
        for name, section in Config().sections().items()
        for f in dataclasses.fields(section)
    }


def test_example_config_lists_every_key_with_its_default() -> None:
    text = (ROOT / "config.example.toml").read_text()
    flat = {f"{s}.{k}": v for s, values in tomllib.loads(text).items() for k, v in values.items()}
    expected = config_keys()
    # Env-only secrets and the rules are documented in comments, as examples.
    for key in ("redaction.hmac_key", "redaction.rules"):
        del expected[key]
    assert "PRECOGX_SIDECAR_REDACTION_HMAC_KEY" in text
    assert text.count("# [[redaction.rules]]") >= 5
    assert flat == expected


def test_readme_documents_every_key() -> None:
    missing = [key for key in config_keys() if f"`{key}`" not in README]
    assert missing == []


def test_readme_documents_every_metric() -> None:
    names = {
        m.name + ("_total" if m.type == "counter" else "")
        for m in Metrics().registry.collect()
    }
    missing = sorted(n for n in names if n not in README)
    assert missing == []


def test_readme_test_command_is_what_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    command = ci.strip().splitlines()[-1]
    assert command in README
    assert re.search(r"pytest", command)
