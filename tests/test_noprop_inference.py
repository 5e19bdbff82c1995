"""NoProp-DT inference noise (``inference_noise``): the sampled chain (paper, 1), the posterior-mean chain (0) and
anything between, against the recursion written out by hand; saved models without the option keep sampling."""
import json

import pytest
import torch

from flowlab.noprop import NoPropClassifier
from flowlab.train import ConfigError, load_config


def _model(**kw):
    torch.manual_seed(0)
    return NoPropClassifier(variant="dt", image_shape=(1, 8, 8), num_classes=10, num_blocks=4, hidden_dim=16,
                            channels=(4, 8), dropout=0.0, **kw).eval()


def _by_hand(m, x, seed, scale):
    """``z_0 ~ N(0, I)``, then ``z_t = a_t u_hat_t + b_t z_{t-1} + scale sqrt(c_t) eps_t``, drawing in the documented order."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((len(x), m.embed_dim), generator=g)
    eps = [torch.randn((len(x), m.embed_dim), generator=g) for _ in m.blocks] if scale > 0 else None
    a, b, c = (v.float() for v in m.schedule.inference_coefficients())
    with torch.no_grad():
        for t in range(len(m.blocks)):
            z = a[t] * m.block_denoise(t, x, z) + b[t] * z
            if eps is not None:
                z = z + scale * c[t].sqrt() * eps[t]
    return z


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0])
def test_final_state_is_the_recursion_with_scaled_noise(scale):
    m = _model(inference_noise=scale)
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        z = m.final_state(x, torch.Generator().manual_seed(3))
    torch.testing.assert_close(z, _by_hand(m, x, 3, scale))


def test_mean_chain_differs_from_the_sampled_chain_only_by_the_noise():
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    sampled, mean = _model(inference_noise=1.0), _model(inference_noise=0.0)
    with torch.no_grad():
        zs = sampled.final_state(x, torch.Generator().manual_seed(1))
        zm = mean.final_state(x, torch.Generator().manual_seed(1))
    assert not torch.allclose(zs, zm)  # the option does change inference ...
    torch.testing.assert_close(zm, mean.dt_chain(x.float(), torch.randn((6, mean.embed_dim), generator=torch.Generator().manual_seed(1))))


def test_saved_model_without_the_option_keeps_sampling(tmp_path):
    m = _model(inference_noise=1.0)
    m.save_pretrained(tmp_path / "m")
    cfg_file = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("inference_noise")  # as written before the option existed
    cfg_file.write_text(json.dumps(cfg))
    old = NoPropClassifier.from_pretrained(tmp_path / "m")
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(old.predict_proba(x), m.predict_proba(x))
    assert NoPropClassifier.from_pretrained(tmp_path / "m").config.inference_noise == 1.0


def test_bad_inference_noise_is_named():
    with pytest.raises(ValueError, match="inference_noise"):
        _model(inference_noise=1.5)
    with pytest.raises(ConfigError, match="noprop.inference_noise"):
        load_config(None, ["recipe=noprop", "noprop.inference_noise=-0.1"])
