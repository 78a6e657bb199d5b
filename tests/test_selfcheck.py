"""`fastimagenet selfcheck` end to end on this CPU machine: the CUDA checks are reported as skipped and the CPU
figures printed, here and as it runs in a stock PyTorch environment (no DALI, no FFCV, no built region decoder)."""

from __future__ import annotations

import json
import sys

from tests.processes import run_to_end

# selfcheck as a stock PyTorch container runs it: the optional packages and our C extension fail to import
_STOCK = """
import sys
for name in ("nvidia.dali", "ffcv", "fastimagenet.loaders._jpeg_roi"):
    sys.modules[name] = None  # import fails with ImportError
from fastimagenet.cli import main
sys.exit(main(["selfcheck", "--json", sys.argv[1]]))
"""


def _results(path) -> dict[str, tuple[str, str]]:
    return {check["name"]: (check["result"], check["figure"]) for check in json.loads(path.read_text())["checks"]}


def test_selfcheck_runs_every_cpu_check_and_skips_the_cuda_ones(tmp_path):
    done = run_to_end([sys.executable, "-m", "fastimagenet", "selfcheck", "--json", str(tmp_path / "s.json")],
                      tmp_path / "selfcheck.log")
    assert done.returncode == 0, done.stdout[-3000:]
    results = _results(tmp_path / "s.json")
    assert {result for result, _ in results.values()} == {"ok", "skipped"}
    assert results["no host sync, compiled bf16/fp16"] == ("skipped", "needs CUDA")
    assert results["fp16 first step skipped (cpu)"][0] == "ok"
    for name in ("torchvision", "dali", "ffcv"):
        result, figure = results[f"bench train resnet10_small, {name}"]
        assert result == "ok" and "32 px:" in figure and "48 px:" in figure and "efficiency" in figure
    assert "bench train resnet10_small, torchvision" in done.stdout  # the table, as well as the file


def test_selfcheck_in_a_stock_pytorch_environment_lists_what_is_missing_and_checks_the_rest(tmp_path):
    done = run_to_end([sys.executable, "-c", _STOCK, str(tmp_path / "s.json")], tmp_path / "selfcheck.log")
    assert done.returncode == 0, done.stdout[-3000:]
    results = _results(tmp_path / "s.json")
    assert results["backend dali"] == ("skipped", "the 'dali' loader needs 'nvidia.dali', which is not installed: "
                                                  "pip install nvidia-dali-cuda120")
    assert results["backend ffcv"][0] == "skipped" and "pip install ffcv" in results["backend ffcv"][1]
    assert results["JPEG region decoder"][0] == "skipped"
    assert results["bench train resnet10_small, torchvision"][0] == "ok"
    assert not any(name.endswith((", dali", ", ffcv")) for name in results)
