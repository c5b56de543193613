"""bench/model.py: ``--preset`` sizes the models it measures (the Learning issue's GPU run asks for gato-79m)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from mugato_ray.config import ModelConfig, TokenizerConfig
from mugato_ray.model import GatoModel
from mugato_ray.tokenizer import ByteTokenizer, make_vocab

ROOT = Path(__file__).resolve().parents[1]


def test_the_preset_sizes_training_decoding_and_acting():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "model.py"), "--quick", "--preset", "tiny",
                          "--batch", "3", "--threads", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
    vocab = make_vocab(TokenizerConfig(), ByteTokenizer())
    params = GatoModel(ModelConfig(preset="tiny", context=512), vocab).num_params() / 1e6
    train = re.search(r"^train (\S+)  params=([\d.]+)M  B=(\d+) T=512", out, re.M)
    assert train, out
    assert train.group(1) == "tiny" and float(train.group(2)) == round(params, 2) and train.group(3) == "3"
    assert re.search(r"^decode tiny at context 1024", out, re.M), out
    assert len(re.findall(r"^acting tiny, ", out, re.M)) == 2, out
    assert "small" not in out
