"""pytest plugin for TRL's own ``tests/test_grpo_trainer.py``, run offline, stock or swapped.

``run.py`` copies TRL's test file and its helpers into ``upstream/trl_tests/`` (git-ignored) and runs pytest on
it from this folder, so this conftest applies to it:

- ``--trainer stock`` runs TRL's ``GRPOTrainer``/``GRPOConfig`` as installed;
- ``--trainer swap`` replaces ``trl.GRPOTrainer``/``trl.GRPOConfig`` by ``GRPOFixTrainer``/``GRPOFixConfig``
  before the test module is imported (it does ``from trl import GRPOConfig, GRPOTrainer``): the README's
  one-line swap, with grpo-fix's defaults for every option the test does not set.

Both runs are offline: ``HF_HUB_CACHE`` points at tiny local checkpoints under the Hub's ids
(:mod:`tiny_hub`), and ``datasets.load_dataset`` returns TRL's "zen" test datasets built by TRL's own
``scripts/generate_zen*_dataset.py`` (copied next to the tests; their ``push_to_hub`` calls are captured).

Skipped in both runs, with the reason in the report: tests that need liger-kernel (``use_liger_kernel=True``
or ``@require_liger_kernel``; TRL 1.16 deprecates it), tests that load a Hub checkpoint :mod:`tiny_hub` cannot
build (the vision-language models), tests whose faked generations hard-code ordinary token ids of Qwen's real
vocabulary, and, through TRL's own markers, tests that need vLLM, a GPU, bitsandbytes, ``kernels`` or jmespath
when those are not installed.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
os.environ["HF_HUB_CACHE"] = str(WORK / "hub")
os.environ["HF_MODULES_CACHE"] = str(WORK / "modules")
os.environ["HF_DATASETS_CACHE"] = str(WORK / "datasets")
for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ[_key] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_DISABLED", "true")

sys.path.insert(0, str(HERE))
import pytest  # noqa: E402
import tiny_hub  # noqa: E402

UPSTREAM = HERE / "upstream"
LIGER_REASON = "needs liger-kernel (deprecated in TRL 1.16): skipped in both runs"
QWEN_IDS_REASON = (
    "hard-codes token ids of Qwen's real 151k-token vocabulary (a faked generation decoded as tool calls); "
    "the offline tokenizer keeps only the special-token ids: skipped in both runs"
)
INT_LIST = re.compile(r"\[(?:\s*\d+\s*,)+\s*\d+\s*,?\s*\]")


def _hard_codes_qwen_vocabulary(source: str) -> bool:
    """A literal list of token ids mixing Qwen's ordinary ids (256..151642) with its special ones (>= 151643)."""
    for literal in INT_LIST.findall(source):
        ids = [int(x) for x in re.findall(r"\d+", literal)]
        if any(256 <= i < tiny_hub.QWEN_FIRST_ADDED_ID for i in ids) and max(ids) >= tiny_hub.QWEN_FIRST_ADDED_ID:
            return True
    return False


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--trainer",
        choices=("stock", "swap"),
        default="stock",
        help="stock: TRL's GRPOTrainer; swap: grpo_fix.integration.trl.GRPOFixTrainer/GRPOFixConfig",
    )


def _install_swap() -> None:
    import trl

    from grpo_fix.integration.trl import GRPOFixConfig, GRPOFixTrainer

    trl.GRPOTrainer = GRPOFixTrainer
    trl.GRPOConfig = GRPOFixConfig


def _zen_datasets() -> dict[tuple[str, str], object]:
    """Every (repo id, config) TRL's zen generator scripts push, built locally by running them."""
    import datasets
    import numpy as np

    built: dict[tuple[str, str], object] = {}

    def capture(self, repo_id, config_name="default", **kwargs):
        built[(repo_id, config_name)] = self

    original = datasets.DatasetDict.push_to_hub
    datasets.DatasetDict.push_to_hub = capture
    try:
        for script, repo in (
            ("generate_zen_dataset.py", "trl-internal-testing/zen"),
            ("generate_zen_image_dataset.py", "trl-internal-testing/zen-image"),
            ("generate_zen_multi_image_dataset.py", "trl-internal-testing/zen-multi-image"),
        ):
            spec = importlib.util.spec_from_file_location(f"_trl_{script[:-3]}", UPSTREAM / "scripts" / script)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            np.random.seed(0)  # the image scripts draw random images
            module.main(test_size=0.1, push_to_hub=True, repo_id=repo)
    finally:
        datasets.DatasetDict.push_to_hub = original
    return built


def _install_offline_datasets() -> None:
    import datasets

    cache: dict[tuple[str, str], object] = {}

    def load_dataset(path, name=None, split=None, streaming=False, **kwargs):
        if not cache:
            cache.update(_zen_datasets())
        key = (path, name or "default")
        if key not in cache:
            raise FileNotFoundError(f"trl_suite: no offline copy of dataset {key}")
        dd = cache[key]
        if split is None:
            return (
                datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in dd.items()}) if streaming else dd
            )
        return dd[split].to_iterable_dataset() if streaming else dd[split]

    datasets.load_dataset = load_dataset


def _shim_trl_helpers() -> None:
    """Helpers the test snapshot imports from ``trl.import_utils`` that the 1.16.0 wheel no longer has."""
    import importlib

    import_utils = importlib.import_module("trl.import_utils")
    if not hasattr(import_utils, "is_joblib_available"):
        import_utils.is_joblib_available = lambda: importlib.util.find_spec("joblib") is not None


def pytest_configure(config: pytest.Config) -> None:
    tiny_hub.build_hub(WORK / "hub")
    _shim_trl_helpers()
    _install_offline_datasets()
    if config.getoption("--trainer") == "swap":
        _install_swap()


def _skip_reason(item: pytest.Item) -> str | None:
    params = getattr(getattr(item, "callspec", None), "params", {})
    if params.get("use_liger_kernel") is True:
        return LIGER_REASON
    for mark in item.iter_markers("skipif"):
        if mark.kwargs.get("reason") == "test requires liger-kernel":
            return LIGER_REASON
    function = getattr(item, "function", None)
    source = inspect.getsource(function) if function is not None else ""
    source = source[source.find("def ") :]  # the body, not the parametrize lists of sibling items
    missing = tiny_hub.missing_ids(" ".join(map(str, params.values()))) or tiny_hub.missing_ids(source)
    if missing:
        return f"loads {missing[0]} (vision-language; no offline tiny build): skipped in both runs"
    if _hard_codes_qwen_vocabulary(source):
        return QWEN_IDS_REASON
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        reason = _skip_reason(item)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
