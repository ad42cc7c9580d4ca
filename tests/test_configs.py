"""Every YAML in configs/ parses and validates into a MergeSpec."""

import glob
import math
import os

import pytest
import yaml

from expo_dist.spec import build_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
# the paper's published pairs and alphas (../shared/DESIGN.md); tulu-2-dpo-70b's alpha is our choice
PAPER = {
    "zephyr-7b-alpha": ("HuggingFaceH4/mistral-7b-sft-alpha", "HuggingFaceH4/zephyr-7b-alpha", 0.3),
    "zephyr-7b-beta": ("HuggingFaceH4/mistral-7b-sft-beta", "HuggingFaceH4/zephyr-7b-beta", 0.1),
    "starling-lm-7b-beta": ("openchat/openchat-3.5-0106", "Nexusflow/Starling-LM-7B-beta", 0.5),
    "snorkel-mistral-pairrm-dpo": ("mistralai/Mistral-7B-Instruct-v0.2", "snorkelai/Snorkel-Mistral-PairRM-DPO", 0.3),
    "llama3-iterative-dpo-final": ("RLHFlow/LLaMA3-SFT", "RLHFlow/LLaMA3-iterative-DPO-final", 0.3),
    "internlm2-chat-1_8b": ("internlm/internlm2-chat-1_8b-sft", "internlm/internlm2-chat-1_8b", 0.5),
    "internlm2-chat-7b": ("internlm/internlm2-chat-7b-sft", "internlm/internlm2-chat-7b", 0.5),
    "internlm2-chat-20b": ("internlm/internlm2-chat-20b-sft", "internlm/internlm2-chat-20b", 0.5),
    "tulu-2-dpo-13b": ("allenai/tulu-2-13b", "allenai/tulu-2-dpo-13b", 0.5),
    "tulu-2-dpo-70b": ("allenai/tulu-2-70b", "allenai/tulu-2-dpo-70b", 0.5),
}


def test_every_paper_pair_has_a_config():
    names = {os.path.basename(c)[:-5] for c in CONFIGS}
    assert set(PAPER) <= names
    assert "demo" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p))
def test_config_validates(path):
    spec = build_spec(path, {}).validate(need_out=False)
    alphas = spec.alpha if isinstance(spec.alpha, list) else [spec.alpha]
    assert all(math.isfinite(a) and 0 < a <= 1 for a in alphas)
    name = os.path.basename(path)[:-5]
    if name in PAPER:
        sft, aligned, alpha = PAPER[name]
        assert (spec.sft, spec.aligned, spec.alpha) == (sft, aligned, alpha)
        with open(path) as f:
            assert "description" in yaml.safe_load(f)


def test_cli_flags_override_config():
    spec = build_spec(os.path.join(ROOT, "configs", "zephyr-7b-beta.yaml"), {"alpha": "0.2", "out": "/tmp/x"})
    assert spec.validate().alpha == 0.2 and spec.out == "/tmp/x"


def test_unknown_key_refused(tmp_path):
    from expo_dist.errors import ExpoError

    bad = tmp_path / "bad.yaml"
    bad.write_text("sft: a\naligned: b\nalpha: 0.3\nalhpa: 0.5\n")
    with pytest.raises(ExpoError, match="alhpa"):
        build_spec(str(bad), {})
