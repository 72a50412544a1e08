"""The runtime imports without torch or transformers (a robotics app installs only the base package)."""

import subprocess
import sys

BLOCK = "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "


def test_runtime_imports_with_torch_blocked():
    code = BLOCK + ("import dream_export.runtime, dream_export.runtime.tree, dream_export.runtime.accept; "
                    "import dream_export.cli; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_cli_needing_torch_fails_clearly_without_it(tmp_path):
    code = BLOCK + "from dream_export.cli import main; sys.argv = ['dream-export', 'demo', '-n', '1']; main()"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2
    assert "export extra" in r.stderr and "Traceback" not in r.stderr
