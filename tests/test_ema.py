"""The EMA under bf16 follows DeepSpeed's float32 master weights, not the bf16 module weights."""
from __future__ import annotations

import json

import pytest
import torch

from medsyn_site.config import CONFIG_DIR, TrainConfig
from medsyn_site.diffusion import engine as eng
from medsyn_site.diffusion.model import EMA


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_bf16_ema_accumulates_updates_below_bf16_resolution(tmp_path, zero_stage):
    """ZeRO 0 (DeepSpeed's unfused bf16 optimizer) and ZeRO 1 (partitioned fp32 masters)."""
    ds = json.loads((CONFIG_DIR / "deepspeed" / "cpu.json").read_text())
    ds["zero_optimization"] = {"stage": zero_stage}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    eng.select_accelerator("cpu")
    eng.init_distributed()
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 8)
    with torch.no_grad():
        net.weight.fill_(1.0)  # bf16 spacing at 1.0 is 2^-7 ~ 0.0078; each AdamW step moves ~lr = 1e-4
        net.bias.fill_(1.0)
    cfg = TrainConfig(precision="bf16", batch_size=4, lr=1e-4, activation_checkpointing=False,
                      deepspeed_config=str(tmp_path / "ds.json"))
    engine, _ = eng.make_engine(net, cfg)
    assert engine.module.weight.dtype == torch.bfloat16
    masters = eng.fp32_masters(engine)
    ema = EMA(engine.module, decay=0.5, master=masters)
    expect = ema.shadow["weight"].clone()
    assert expect.dtype == torch.float32 and torch.equal(expect, torch.ones(8, 8))
    for step in range(5):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()
        ema.update(engine.module)
        master = masters(engine.module.weight)
        expect = 0.5 * expect + 0.5 * master
    moved = (torch.ones(8, 8) - master).abs()
    assert moved.max() < 2 ** -9 and moved.min() > 1e-5  # the masters moved, by less than bf16 resolves
    assert torch.equal(engine.module.weight.float(), torch.ones(8, 8))  # so the bf16 weights did not
    assert torch.allclose(ema.shadow["weight"], expect, rtol=0, atol=1e-7)  # the EMA follows the masters
    assert (ema.shadow["weight"] != 1).all()
    assert ema.state_dict()["weight"].device.type == "cpu"


def test_fp32_ema_without_zero_uses_the_module_weights():
    """fp32 + ZeRO 0: DeepSpeed keeps no separate master; the module's weights are the master."""
    eng.select_accelerator("cpu")
    eng.init_distributed()
    net = torch.nn.Linear(4, 4)
    engine, _ = eng.make_engine(net, TrainConfig(batch_size=2, activation_checkpointing=False))
    masters = eng.fp32_masters(engine)
    assert masters(engine.module.weight) is None
    ema = EMA(engine.module, decay=0.0, master=masters)
    engine.backward(engine(torch.randn(2, 4)).sum())
    engine.step()
    ema.update(engine.module)
    assert torch.equal(ema.shadow["weight"], engine.module.weight.detach())
