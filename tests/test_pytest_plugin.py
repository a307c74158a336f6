"""llmguard's pytest plugin is loaded by every pytest run where llmguard is installed: it must
import no llmguard module until a test asks for ``fake_llm``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path


def test_loading_the_plugin_imports_no_llmguard_module() -> None:
    code = (
        "import sys, _llmguard_pytestplugin\n"
        "loaded = sorted(m for m in sys.modules if m == 'llmguard' or m.startswith('llmguard.'))\n"
        "print(loaded)\n"
        "assert hasattr(_llmguard_pytestplugin, 'fake_llm')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"


def test_the_pytest11_entry_point_is_the_lightweight_module() -> None:
    (plugin,) = [ep for ep in entry_points(group="pytest11") if ep.name == "llmguard"]
    assert plugin.value == "_llmguard_pytestplugin"


def test_another_projects_pytest_run_loads_llmguard_only_for_fake_llm(tmp_path: Path) -> None:
    (tmp_path / "test_other.py").write_text(
        textwrap.dedent(
            """
            import json
            import sys
            import urllib.request


            def test_1_no_llmguard_before_the_fixture_is_used():
                assert not [m for m in sys.modules if m.split(".")[0] == "llmguard"]


            def test_2_fake_llm_is_a_running_server(fake_llm):
                body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
                request = urllib.request.Request(
                    fake_llm.openai_base_url + "/chat/completions",
                    data=json.dumps(body).encode(),
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=10) as response:
                    assert json.load(response)["model"] == "gpt-4o-mini"
                assert len(fake_llm.requests) == 1
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_other.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
