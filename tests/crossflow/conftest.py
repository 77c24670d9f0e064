"""Set-up shared by the crossflow tests.

    torch_backend   fixture: run the test on the torch kernels backend (`pytestmark = pytest.mark.usefixtures(...)`
                    for a whole file); the Triton path is compared against it in models/test_parity.py
    perturb         fixture: `perturb(module, std=0.1, everywhere=False)` gives the zero-initialised adaLN-Zero /
                    output weights N(0, std) values so every path carries signal (`everywhere=True`: adds N(0, std)
                    noise to every parameter, so a load that skips a tensor shows); returns the module
    randomize       fixture: `randomize(dimr_model, generator)` makes every time-dependent parameter and the indicator
                    of a DiMR network matter, ours or the official oracle's (at init p0 == p1 and the blend is a no-op)
    one_thread      fixture: one intra-op thread for the test (small CPU models on a busy machine)
    img2img_config  fixture: `img2img_config(preset)`, the `digits-sr` / `digits-vary` config at tiny widths (shapes and
                    API, not quality)
    img2img_checkpoints
                    fixture (per module): {"digits-sr": dir, "digits-vary": dir}, untrained tiny models saved as the
                    shipped ones are
    cli_fails       fixture: `cli_fails(argv, code)` runs `crossflow.cli.main(argv)` in-process, asserts it exits with
                    `code` after printing exactly one `crossflow: error:` line (no traceback); returns that line
"""

import pytest
import torch

import crossflow_kernels


@pytest.fixture
def torch_backend():
    with crossflow_kernels.use_backend("torch"):
        yield


def perturb_(module: torch.nn.Module, std: float = 0.1, everywhere: bool = False) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            if everywhere:
                p.add_(std * torch.randn_like(p))
            elif not p.any():
                p.normal_(0, std)
    return module


@pytest.fixture(scope="session")  # a pure function: usable from module-scoped fixtures too
def perturb():
    return perturb_


def randomize_(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf.startswith("nodecay_"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif leaf in ("param0", "param1"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
            elif leaf.startswith("tensor_") or (name.endswith("norm.linear.weight")) or leaf == "scale":
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="session")  # a pure function, as `perturb`
def randomize():
    return randomize_


@pytest.fixture
def one_thread():
    """Small CPU models on a busy machine: one intra-op thread (two threads on two loaded cores cost ~15x, see
    `crossflow.cli.SMALL_FLOW_WORK`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def img2img_config_(preset: str):
    from crossflow.config import CrossFlowConfig

    return CrossFlowConfig.from_name(preset, hidden_size=32, depth=1, num_heads=2, image_ve_width=8,
                                     image_encoder_width=8, image_feature_dim=16)


@pytest.fixture(scope="session")  # a pure function, as `perturb`
def img2img_config():
    return img2img_config_


@pytest.fixture(scope="module")
def img2img_checkpoints(tmp_path_factory):
    """Untrained tiny digits-sr / digits-vary models, saved as the shipped ones are."""
    from crossflow.models.model import CrossFlow

    out = {}
    for preset in ("digits-sr", "digits-vary"):
        torch.manual_seed(0)
        d = tmp_path_factory.mktemp(preset)
        CrossFlow(img2img_config_(preset)).save_pretrained(d)
        out[preset] = d
    return out


@pytest.fixture
def cli_fails(capsys):
    from crossflow import cli

    def run(argv: list[str], code: int) -> str:
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == code
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("crossflow: error: ") and "Traceback" not in err, err
        return err

    return run
