"""Weight compatibility with timm's dm_nfnet (ports of DeepMind's checkpoints). timm is test-only."""

from __future__ import annotations

import pytest
import timm  # pinned in requirements.lock as a test-only dependency
import torch

from models import create_model
from models.convert import load_timm_weights, model_from_timm


def _randomised_timm(name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    ref = timm.create_model(name, pretrained=False, **kw).eval()
    # Move gains, biases and skip gains off their init so the comparison exercises every tensor.
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.endswith("skipinit_gain"):
                p.uniform_(0.2, 1.0)
            elif n.endswith("gain"):
                p.uniform_(0.5, 1.5)
            elif n.endswith("bias"):
                p.normal_(0.0, 0.1)
    return ref


def test_timm_dm_nfnet_f0_gives_same_logits():
    ref = _randomised_timm("dm_nfnet_f0")
    ours = model_from_timm("nfnet_f0", ref.state_dict()).eval()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 192, 192)
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    rel = ((expected - got).norm() / expected.norm()).item()
    # measured 3.6e-7 (fp32 rounding); a convention slip such as erf instead of tanh GELU gives 2.6e-4
    assert rel < 1e-5
    assert expected.std().item() > 0.05  # the logits carry signal, not a near-zero output


def test_wrong_architecture_is_a_clear_error():
    ref = timm.create_model("dm_nfnet_f0", pretrained=False)
    with pytest.raises(ValueError, match="missing .*stages.0.1"):
        load_timm_weights(create_model("nfnet_f1"), ref.state_dict())
    wrong_classes = {k: v for k, v in ref.state_dict().items()}
    wrong_classes["head.fc.weight"] = torch.zeros(10, 3072)
    with pytest.raises(ValueError, match="shape mismatch head.fc.weight"):
        load_timm_weights(create_model("nfnet_f0"), wrong_classes)


def test_convert_cli_roundtrip(tmp_path):
    from safetensors.torch import load_file

    from models.convert import main

    ref = _randomised_timm("dm_nfnet_f0", seed=3)
    src = tmp_path / "dm_nfnet_f0.pth"
    torch.save(ref.state_dict(), src)
    dst = tmp_path / "nfnet_f0.safetensors"
    main([str(src), str(dst), "--model", "nfnet_f0"])
    sd = load_file(str(dst))
    assert sd["stages.0.0.skip_gain"].item() == pytest.approx(ref.stages[0][0].skipinit_gain.item())
    assert sd["stem.conv1.gain"].shape == (16,)
