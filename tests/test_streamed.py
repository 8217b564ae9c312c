"""Streamed (z-slab) whole-volume evaluation computes MONAI's DiffusionModelUNet forward exactly,
within a device byte budget, and `medsyn sample --stream-gb` samples the same volumes."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from click.testing import CliRunner

from medsyn_site.cli import main
from medsyn_site.config import ModelConfig
from medsyn_site.data.cohort import Cohort
from medsyn_site.diffusion.model import build_unet
from medsyn_site.diffusion.sample import Sampler, resolve_weights, sample_cohort
from medsyn_site.diffusion.streamed import StreamedUNet


def _net(channels, groups, blocks, **kw):
    cfg = ModelConfig(channels=list(channels), attention_levels=[False] * len(channels), num_res_blocks=blocks,
                      norm_num_groups=groups, num_head_channels=8, **kw)
    net = build_unet(cfg).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # MONAI zero-initialises conv2 and the output conv: randomise everything
        for p in net.parameters():
            p.normal_(0, 0.05)
    return net


@pytest.mark.parametrize("channels,groups,blocks", [((16, 32, 32), 8, 1), ((16, 16, 32, 32), 8, 2)])
@pytest.mark.parametrize("budget", [float("inf"), 0, 300_000])
def test_streamed_equals_monai_forward(channels, groups, blocks, budget):
    net = _net(channels, groups, blocks)
    x = torch.randn(2, 5, 24, 16, 40)  # odd slab splits, Y != X, a batch with two timesteps
    t = torch.tensor([3, 700])
    with torch.no_grad():
        ref = net(x, t)
        streamed = StreamedUNet(net, slab_voxels=16 * 40 * 5, budget_bytes=budget)
        out = streamed(x, t)
    assert out.shape == ref.shape
    assert ref.abs().max() > 0.05  # a non-trivial output
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    store = streamed.store
    assert store.peak["device"] <= budget
    if budget == float("inf"):
        assert store.peak["host"] == 0 and store.moved == 0
    else:
        assert store.peak["host"] > 0 and store.moved > 0


def test_streamed_under_bf16_autocast_is_as_close_as_bf16_itself():
    """The GPU path's precision (bf16 autocast; here on the CPU): maps stored in bf16, GroupNorm
    statistics in float32; the streamed result differs from MONAI's bf16 forward no more than bf16
    differs from float32."""
    net = _net((16, 32, 32), 8, 1)
    x, t = torch.randn(1, 5, 24, 32, 32), torch.tensor([100])
    with torch.no_grad():
        ref32 = net(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = net(x, t)
            streamed = StreamedUNet(net, slab_voxels=32 * 32 * 3, whole_voxels=64, budget_bytes=100_000)
            out = streamed(x, t)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert streamed.store.peak["host"] > 0
    bf16_error = (ref.float() - ref32).abs().max()
    assert (out.float() - ref.float()).abs().max() <= 2 * bf16_error


def test_streamed_budget_spills_oldest_maps_first():
    """Streaming every level: with no budget every map lives on the host; with half the maps' peak
    the device holds at most that, and evicting the oldest maps (skips, needed last) moves far fewer
    bytes than keeping nothing on the device."""
    net = _net((16, 32, 32), 8, 1)
    x, t = torch.randn(1, 5, 32, 32, 32), torch.tensor([10])
    runs = {}
    with torch.no_grad():
        ref = net(x, t)
        for name, budget in (("all", float("inf")), ("none", 0)):
            runs[name] = StreamedUNet(net, slab_voxels=32 * 32 * 4, budget_bytes=budget)
            runs[name](x, t)
        half = runs["all"].store.peak["device"] / 2
        runs["half"] = StreamedUNet(net, slab_voxels=32 * 32 * 4, budget_bytes=half)
        torch.testing.assert_close(runs["half"](x, t), ref, rtol=1e-4, atol=1e-5)
    assert runs["none"].store.peak["device"] == 0
    assert runs["none"].store.peak["host"] == runs["all"].store.peak["device"]
    assert 0 < runs["half"].store.peak["device"] <= half
    assert 0 < runs["half"].store.moved < runs["none"].store.moved / 3


def test_streamed_refuses_attention_at_a_streamed_level():
    net = _net((16, 32, 32), 8, 1, mid_attention=True)
    x = torch.randn(1, 5, 16, 16, 16)
    with pytest.raises(NotImplementedError, match="middle-block attention"):
        StreamedUNet(net, slab_voxels=8, whole_voxels=8)(x, torch.tensor([1]))
    with torch.no_grad():  # where the level is small, MONAI's own block (with attention) runs
        torch.testing.assert_close(StreamedUNet(net, slab_voxels=8, whole_voxels=16 ** 3 // 64)(x, torch.tensor([1])),
                                   net(x, torch.tensor([1])), rtol=1e-4, atol=1e-5)


def test_sample_stream_gb_gives_the_same_volumes(run, phantom_cohort, key, tmp_path):
    whole, streamed = tmp_path / "whole", tmp_path / "streamed"
    sample_cohort(run, f"cohort:{phantom_cohort}", whole, sampler="ddim", steps=2, seed=4, site_key=key)
    res = CliRunner().invoke(main, ["sample", "--run", str(run), "--masks", f"cohort:{phantom_cohort}",
                                    "--sampler", "ddim", "--steps", "2", "--seed", "4", "--stream-gb", "0",
                                    "--out", str(streamed), "--site-key", str(key)])
    assert res.exit_code == 0, res.output
    for rec in Cohort(whole).cases:
        a, b = Cohort(whole).arrays(rec.id)[0], Cohort(streamed).arrays(rec.id)[0]
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    # (above: within each window of the training patch); and the whole volume at once with every level
    # streamed in thin slabs (what a 512x512x256 volume gets with --window whole)
    cohort = Cohort(phantom_cohort)
    mask = cohort.read(cohort.split("train")[0].id)[1]
    gens = [Sampler(resolve_weights(run), "ddim", 2, window="whole"),
            Sampler(resolve_weights(run), "ddim", 2, stream_gb=0, window="whole")]
    gens[1].model.slab_voxels, gens[1].model.whole_voxels = 64 * 64 * 3, 64
    a, b = (g.volumes([mask], [9])[0] for g in gens)
    assert gens[1].model.store.moved > 0
    # float rounding only (DDIM divides by sqrt(alpha_bar) at t ~ 1000): well under 1 HU
    np.testing.assert_allclose(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b), atol=1.0)


def test_streamed_includes_the_coordinate_prior_head():
    """With model.coord_head the network adds a per-voxel MLP of the coordinate channels; the streamed
    evaluation adds the same (the head chunks itself in z without gradients)."""
    net = _net((16, 32, 32), 8, 1, coord_head=16)
    x = torch.randn(1, 5, 24, 16, 40)
    t = torch.tensor([500])
    with torch.no_grad():
        ref = net(x, t)
        head = net.coord_head(x[:, 2:5], t)
        out = StreamedUNet(net, slab_voxels=16 * 40 * 5, budget_bytes=0)(x, t)
    assert head.abs().max() > 0.01  # the head contributes
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    tall = torch.rand(1, 3, 900, 16, 40) * 2 - 1  # > 2**22 / (16 * 40 * 16) slices: evaluated in z-chunks
    with torch.no_grad():
        chunked = net.coord_head(tall, t)
    with torch.enable_grad():  # the chunked (no-grad) and whole (grad) head agree
        torch.testing.assert_close(net.coord_head(tall, t).detach(), chunked)
