"""Diagnosis probe (issue #19): how much of a GeoLoRA adapter's core gradient sits in its S
(Galerkin) block. Per step, for each of the 24 matrices: rms of U^T G V (r x r) over rms of the
whole tangent core G^ (its 3 r^2 free entries), from the one backward pass (G V = dL/dU / S); the
median / min / max over the matrices every 5 steps. With one second moment per layer ("unit") the
S entries' step is lr times this ratio or less (times their share of it).

PYTHONPATH=src python docs/results/geolora-finetune/core_share_side_run.py '{"lr": 1e-2, "opt": {"second_moment": "unit"}}'
Output: core_share_side_run.txt.
"""

import copy
import json
import sys

import torch

torch.set_num_threads(1)
import torchlowrank.experiments.geolora_finetune as gf
from torchlowrank.adapters.model import adapter_layers
from torchlowrank.data import load_rotten_tomatoes
from torchlowrank.experiments.training import encode_texts
from torchlowrank.models import load_minilm

spec = json.loads(sys.argv[1])
tok, base = load_minilm(num_labels=2, seed=0)
base.eval()
for p in base.parameters():
    p.requires_grad_(False)
data = load_rotten_tomatoes(seed=0)
g = torch.Generator().manual_seed(0)
tr = torch.randperm(len(data.train_labels), generator=g).tolist()[:512]
x_tr = encode_texts(tok, [data.train_texts[i] for i in tr], 32)
y_tr = data.train_labels[tr]
torch.manual_seed(0)
cfg = gf.Config(seeds=(0,))
model = gf.adapt(
    copy.deepcopy(base),
    gf.GeoLoRAConfig(
        r=8,
        tau=0.01,
        rank_budget=gf.budget_parameters(cfg, base),
        target_modules=gf.TARGETS,
        modules_to_save=["classifier"],
    ),
)
opt = gf.geolora_optimizer(model, lr=spec["lr"], **spec.get("opt", {}))  # head at 1e-3 below
for grp in opt.param_groups:
    if grp["unit"] is None:
        grp["lr"] = 1e-3
layers = adapter_layers(model)
gen = torch.Generator().manual_seed(0)
order = torch.randperm(512, generator=gen)
pos = 0
for step in range(spec.get("steps", 40)):
    if pos + 16 > 512:
        order, pos = torch.randperm(512, generator=gen), 0
    idx = order[pos : pos + 16]
    pos += 16
    out = model(**{k: v[idx] for k, v in x_tr.items()}, labels=y_tr[idx])
    out.loss.backward()
    ratios = []
    if step > 0:
        for _, l in layers:
            u = l.lora_unit
            s = u.S.detach()
            r = s.numel()
            A = u.U.grad / s
            B = u.V.grad / s  # G V, G^T U
            C = u.U.detach().T @ A
            tot = A.pow(2).sum() + B.pow(2).sum() - C.pow(2).sum()
            free = 3 * r * r
            ratios.append(float((C.pow(2).sum() / (r * r)) / (tot / free)) ** 0.5)
            # diag share
    opt.step()
    opt.zero_grad(set_to_none=True)
    gf.rebalance_ranks(model, opt)
    if ratios and (step + 1) % 5 == 0:
        ratios.sort()
        print(
            f"step {step + 1} loss {float(out.loss):.3f} rms(S block)/rms(core) median {ratios[len(ratios) // 2]:.3f} min {ratios[0]:.3f} max {ratios[-1]:.3f}",
            flush=True,
        )
