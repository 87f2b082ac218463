"""The public surface: `import reasonrl` exposes the library's names lazily and stays light."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_light_and_exports_the_surface():
    code = (
        "import sys, reasonrl\n"
        "assert 'torch' not in sys.modules, 'import reasonrl must not import torch'\n"
        "from reasonrl import Config, Trainer, run_training, evaluate, load_config\n"
        "from reasonrl import register_advantage, register_reward, register_engine, register_source, register_model\n"
        "from reasonrl.algorithms import ADVANTAGES\n"
        "from reasonrl.rollout import ENGINES\n"
        "from reasonrl.data.sources import SOURCES\n"
        "from reasonrl.model.builtin import BUILTIN_MODELS\n"
        "assert {'grpo', 'rloo', 'lampo'} <= set(ADVANTAGES) and {'hf', 'fast'} <= set(ENGINES)\n"
        "assert 'arithmetic' in SOURCES and 'tiny' in BUILTIN_MODELS  # the demo registers itself\n"
        "assert Trainer.__module__ == 'reasonrl.train.trainer' and Config.__module__ == 'reasonrl.config'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr


def test_unknown_name_is_an_attribute_error():
    import pytest

    import reasonrl

    with pytest.raises(AttributeError, match="no attribute 'Trainr'"):
        reasonrl.Trainr  # noqa: B018
