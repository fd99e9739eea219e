"""The library must never import torchvision: it is only a test oracle."""

import pkgutil
import subprocess
import sys

import maskrcnn


def test_importing_every_module_does_not_import_torchvision():
    names = [m.name for m in pkgutil.walk_packages(maskrcnn.__path__, "maskrcnn.")]
    assert "maskrcnn.config" in names
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = [m for m in sys.modules if m == 'torchvision' or m.startswith('torchvision.')]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
