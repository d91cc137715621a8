"""FAT model: release compatibility (keys, shapes, golden logits), timm integration, speed paths."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import fatscale  # noqa: F401  (registers the FAT models with timm)
from fatscale.models.complexity import count_macs
from fatscale.models.fat import FAT, FASA, FormatKeepingGroupNorm1
import timm

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "reference"
VARIANTS = ["fat_b0", "fat_b1", "fat_b2", "fat_b3"]
# Parameter counts of the release (issue #2; also in reference/fat_state_dicts.json).
NUM_PARAMS = {"fat_b0": 4_494_488, "fat_b1": 7_819_720, "fat_b2": 13_466_728, "fat_b3": 29_196_264}

# A small FAT that still has every kind of module (4 stages, all window sizes), for fast tests.
TINY = dict(embed_dims=(16, 24, 32, 48), depths=(1, 2, 1, 1), num_heads=(2, 2, 4, 4), num_classes=10)


def reference_file(name: str) -> Path:
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"{path} not present (../shared is optional)")
    return path


@pytest.fixture(scope="module")
def golden() -> dict:
    return load_file(reference_file("fat_b0_golden.safetensors"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_matches_release(variant):
    release = json.loads(reference_file("fat_state_dicts.json").read_text())[variant]
    model = timm.create_model(variant)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == release["state_dict"]
    assert list(ours) == list(release["state_dict"])  # same order too
    assert sum(p.numel() for p in model.parameters()) == release["num_params"] == NUM_PARAMS[variant]
    cfg = release["config"]
    assert list(model.feature_info[i]["num_chs"] for i in range(4)) == cfg["embed_dims"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_count(variant):
    model = timm.create_model(variant)
    assert sum(p.numel() for p in model.parameters()) == NUM_PARAMS[variant]


@pytest.mark.parametrize("size", ["224", "192x256"])
def test_golden_logits_float64(golden, size):
    model = timm.create_model("fat_b0").double().eval()
    model.load_state_dict({k.removeprefix("model."): v for k, v in golden.items() if k.startswith("model.")})
    with torch.no_grad():
        logits = model(golden[f"input_{size}"].double())
    expected = golden[f"logits_{size}"].double()
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() < 1e-8


def test_golden_logits_channels_last_float32(golden):
    """The fast layout computes the same function (float32 tolerance)."""
    model = timm.create_model("fat_b0").eval().to(memory_format=torch.channels_last)
    model.load_state_dict({k.removeprefix("model."): v.float() for k, v in golden.items() if k.startswith("model.")})
    x = golden["input_224"].float().to(memory_format=torch.channels_last)
    with torch.no_grad():
        logits = model(x)
    assert (logits.double() - golden["logits_224"]).abs().max().item() < 1e-3


def explicit_attention(q, k, v):
    return torch.softmax(q.shape[-1] ** -0.5 * q @ k.transpose(-1, -2), -1) @ v


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_fasa_matches_written_out_formula(bidirectional, memory_format):
    """FASA (odd sizes: the downsampler rounds up) against the formulas in its docstring."""
    torch.manual_seed(0)
    fasa = FASA(dim=12, kernel_size=5, num_heads=3, window_size=4, bidirectional=bidirectional).double().eval()
    x = torch.randn(2, 12, 13, 10, dtype=torch.float64).to(memory_format=memory_format)
    with torch.no_grad():
        out = fasa(x)
        q_local = fasa.q(x)
        pooled = fasa.pool(x)
        assert pooled.shape[-2:] == (4, 3)  # ceil(13/4), ceil(10/4)
        q = q_local.reshape(2, 3, 4, 13 * 10).transpose(-1, -2)
        k, v = fasa.kv(pooled).reshape(2, 2, 3, 4, 12).permute(1, 0, 2, 4, 3)
        glob = explicit_attention(q, k, v).transpose(-1, -2).reshape(2, 12, 13, 10)
        local = fasa.local_mixer(q_local)
        local = local * torch.sigmoid(local)
        fused = local * torch.sigmoid(glob) * glob
        if bidirectional:
            fused = fused * torch.sigmoid(local)
        expected = fasa.mixer(fused)
    assert (out - expected).abs().max().item() < 1e-12


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_format_keeping_group_norm_equals_group_norm_and_keeps_the_layout(memory_format):
    torch.manual_seed(0)
    ours, reference = FormatKeepingGroupNorm1(24), torch.nn.GroupNorm(1, 24)
    with torch.no_grad():
        for p in (*ours.parameters(), *reference.parameters()):
            p.copy_(torch.randn_like(p))
    reference.load_state_dict(ours.state_dict())
    x = (3 * torch.randn(4, 24, 13, 10) + 1).to(memory_format=memory_format)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = ours(x1), reference(x2)
    assert out.is_contiguous(memory_format=memory_format)
    assert (out - expected).abs().max().item() < 1e-5
    grad = torch.randn_like(out)
    out.backward(grad), expected.backward(grad)
    assert (x1.grad - x2.grad).abs().max().item() < 1e-5
    for a, b in zip(ours.parameters(), reference.parameters()):
        assert (a.grad - b.grad).abs().max().item() < 1e-4 * b.grad.abs().max().item()


def test_format_keeping_norm_is_a_switch_with_the_same_keys():
    torch.manual_seed(0)
    keeps = FAT(**TINY).eval()
    plain = FAT(**TINY, norm_keeps_format=False).eval()
    assert list(keeps.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(keeps.state_dict(), strict=True)
    assert sum(isinstance(m, FormatKeepingGroupNorm1) for m in keeps.modules()) == 1 + 2 * sum(TINY["depths"]) + 1
    assert not any(isinstance(m, FormatKeepingGroupNorm1) for m in plain.modules())
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert (keeps(x) - plain(x)).abs().max().item() < 1e-4
        # Every block's input stays channels_last: the stem's output is the first block's input.
        assert keeps.patch_embed(x).is_contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # statistics in fp32, as autocast's group_norm
        assert keeps.norm(torch.randn(2, 48, 4, 4, dtype=torch.bfloat16)).dtype == torch.float32


def test_bidirectional_is_an_option_with_the_same_keys():
    torch.manual_seed(0)
    release = FAT(**TINY).eval()
    paper = FAT(**TINY, bidirectional=True).eval()
    assert list(release.state_dict()) == list(paper.state_dict())
    paper.load_state_dict(release.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(release(x), paper(x))
    assert all(not m.bidirectional for m in release.modules() if isinstance(m, FASA))
    assert all(m.bidirectional for m in timm.create_model("fat_b0", bidirectional=True).modules() if isinstance(m, FASA))


@pytest.mark.parametrize("variant", VARIANTS)
def test_default_cfg(variant):
    model = timm.create_model(variant)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224)
    assert cfg["crop_pct"] == 0.875
    assert cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg["crop_pct"] == 0.875 and data_cfg["interpolation"] == "bicubic"


def test_create_model_arguments():
    model = timm.create_model("fat_b0", num_classes=37, drop_path_rate=0.2)
    assert model.head.out_features == 37
    drop_probs = [blk.drop_path.drop_prob for stage in model.layers for blk in stage.blocks if blk.drop_path.__class__.__name__ == "DropPath"]
    assert drop_probs == pytest.approx(torch.linspace(0, 0.2, 12)[1:].tolist())  # the first block's rate is 0
    assert timm.create_model("fat_b3").layers[3].blocks[-1].drop_path.drop_prob == pytest.approx(0.15)


def test_pretrained_file_overlay(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("fat_b0")
    path = tmp_path / "fat_b0.safetensors"
    save_file(source.state_dict(), str(path))
    loaded = timm.create_model("fat_b0", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    # A different number of classes keeps the backbone and drops the head (timm's rule).
    retargeted = timm.create_model("fat_b0", pretrained=True, num_classes=5, pretrained_cfg_overlay=dict(file=str(path)))
    assert retargeted.head.out_features == 5
    assert torch.equal(retargeted.patch_embed.conv1.conv[0].weight, source.patch_embed.conv1.conv[0].weight)


def test_features_only():
    model = timm.create_model("fat_b1", features_only=True)
    assert model.feature_info.channels() == [48, 96, 192, 384]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    feats = model(torch.randn(1, 3, 128, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 48, 32, 24), (1, 96, 16, 12), (1, 192, 8, 6), (1, 384, 4, 3)]

    pruned = timm.create_model("fat_b1", features_only=True, out_indices=(1, 2))
    assert len(pruned.model.layers) == 2  # stages after the last tap are not built into the graph
    feats = pruned(torch.randn(1, 3, 128, 96))
    assert [f.shape[1] for f in feats] == [96, 192]


def test_forward_intermediates_agree_with_forward():
    torch.manual_seed(0)
    model = FAT(**TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, taps = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert [t.shape[-1] for t in taps] == [16, 8, 4, 2]
        normed = model.forward_intermediates(x, indices=[3], norm=True, intermediates_only=True)
        assert torch.equal(normed[0], final)
        early = model.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(early, taps[:2]))


def test_batchnorm_is_plain_and_convertible():
    model = timm.create_model("fat_b0")
    kinds = {type(m) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert kinds == {torch.nn.BatchNorm2d}
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert not any(type(m) is torch.nn.BatchNorm2d for m in synced.modules())
    assert list(synced.state_dict()) == list(timm.create_model("fat_b0").state_dict())


def test_activation_checkpointing_per_stage():
    torch.manual_seed(0)
    model = FAT(**TINY)
    x = torch.randn(2, 3, 64, 64)
    y = torch.tensor([1, 2])

    calls = [0] * len(model.layers)
    for i, stage in enumerate(model.layers):  # count calls of each stage's first block
        def counted(inp, i=i, forward=stage.blocks[0].forward):
            calls[i] += 1
            return forward(inp)

        stage.blocks[0].forward = counted

    def grads() -> tuple[list[torch.Tensor], list[int]]:
        calls[:] = [0] * len(calls)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        return [p.grad.clone() for p in model.parameters()], list(calls)

    plain, plain_calls = grads()
    model.set_grad_checkpointing(stages=[1, 3])
    assert [s.grad_checkpointing for s in model.layers] == [False, True, False, True]
    checkpointed, calls = grads()
    assert plain_calls == [1, 1, 1, 1]
    assert calls == [1, 2, 1, 2]  # checkpointed stages run their forward again in backward
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    model.set_grad_checkpointing(False)
    assert not any(s.grad_checkpointing for s in model.layers)


@pytest.mark.slow
def test_compiles_fullgraph_without_breaks():
    """fullgraph=True raises on any graph break; train-mode forward and backward both compile."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = FAT(**TINY, drop_path_rate=0.1).to(memory_format=torch.channels_last)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    model.train()
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_complexity_close_to_paper():
    """MACs at 224 include the attention matmuls the paper's counter leaves out (~0.05 G for B0)."""
    assert count_macs(timm.create_model("fat_b0"), 224) / 1e9 == pytest.approx(0.75, abs=0.02)
    macs_b2 = count_macs(timm.create_model("fat_b2"), 224) / 1e9
    assert macs_b2 == pytest.approx(2.13, abs=0.03)
    # Quadratic in resolution for the conv part: twice the side, about four times the work.
    assert count_macs(timm.create_model("fat_b0"), 448) / 1e9 > 3.5 * 0.75


def test_torchvision_repair_only_when_needed():
    """`import fatscale` makes timm importable; the schemas are declared only if torchvision's own
    C++ ops fail to load (the CUDA torchvision wheel next to a CPU torch)."""
    code = (
        "import fatscale, fatscale._torchvision_compat as c, timm, torchvision;"
        "from timm.data import Mixup, create_transform;"
        "print(c._schemas is not None, c._torchvision_ops_load())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    repaired, ops_load = out[0] == "True", out[1] == "True"
    assert repaired != ops_load
    if repaired:  # without fatscale first, torchvision fails as described
        failed = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
        assert failed.returncode != 0 and "torchvision::nms" in failed.stderr


@pytest.mark.parametrize("size", [32, 33, 57, 100, 161, 224, 225, 257])
def test_fat_takes_any_input_size(size):
    # Every convolution pads k // 2 (stride-2 ones round up) and attention is global over the
    # downsampled context, so no size is excluded: the recipe's lower bound (32) is its own.
    model = timm.create_model("fat_b0", num_classes=3)
    model(torch.randn(2, 3, size, size + 3)).sum().backward()
    assert model.eval()(torch.randn(1, 3, size, size)).shape == (1, 3)


@pytest.mark.parametrize("variant", ["fat_b0", "fat_b1", "fat_b2", "fat_b3"])
def test_fx_traced_forward_and_backward_match_eager(variant):
    torch.manual_seed(0)
    model = timm.create_model(variant, num_classes=7).eval()  # eval: no drop path, fixed BatchNorm
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 64, 64)
    for memory_format in (torch.contiguous_format, torch.channels_last):  # both sides of the stride branch
        inputs = x.to(memory_format=memory_format)
        eager, fx = model(inputs), traced(inputs)
        assert torch.allclose(eager, fx, atol=1e-6, rtol=0)
    model.zero_grad()
    model(x).square().sum().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    traced(x).square().sum().backward()  # the traced module shares the model's parameters
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, eager_grads[name], atol=1e-5, rtol=1e-4), name


def test_fx_feature_extraction_and_scripting():
    from torchvision.models.feature_extraction import create_feature_extractor

    model = timm.create_model("fat_b0").eval()
    x = torch.randn(1, 3, 96, 128)
    taps = {info["module"]: f"s{i}" for i, info in enumerate(model.feature_info)}
    extractor = create_feature_extractor(model, taps)  # torchvision's FX feature extraction
    expected = model.forward_intermediates(x, intermediates_only=True)
    maps = extractor(x)
    assert list(maps) == ["s0", "s1", "s2", "s3"]
    for got, want, info in zip(maps.values(), expected, model.feature_info):
        assert got.shape == (1, info["num_chs"], 96 // info["reduction"], 128 // info["reduction"])
        assert torch.allclose(got, want, atol=1e-6, rtol=0)
    fx_features = timm.create_model("fat_b0", features_only=True, feature_cls="fx").eval()
    assert [f.shape[1] for f in fx_features(x)] == [32, 80, 160, 256]
    scripted = torch.jit.script(torch.fx.symbolic_trace(model))
    assert torch.allclose(scripted(x), model(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("code", [
    "import fatscale, timm",  # registered when timm is first imported
    "import fatscale, torchvision, timm",  # torchvision first: still repaired, still registered
    "import fatscale, sys; assert 'torch' not in sys.modules and 'timm' not in sys.modules; import timm",
    "import fatscale._torchvision_compat as c; c.ensure_torchvision_importable(); import timm, fatscale",  # timm first
])
def test_import_fatscale_registers_the_models(code):
    code += "; print(timm.list_models('fat_*')); print(timm.create_model('fat_b1').num_classes)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["['fat_b0', 'fat_b1', 'fat_b2', 'fat_b3']", "1000"]
