"""Diagnosis probe (issue #19): GeoLoRA with LowRankAdam's default second moment ("unit"),
seed 0, lr 1e-2 for the units, 1e-3 for the head; per step for layer 3's value matrix: the loss,
dL/dS, the raw (not bias-corrected) second moment v of the unit, the first moment's diagonal and
norm, and S.

PYTHONPATH=src python docs/results/geolora-finetune/second_moment_side_run.py '{"lr": 1e-2, "opt": {"second_moment": "unit"}}'
Output: second_moment_side_run.txt.
"""
import copy, json, sys, time, math
import torch
torch.set_num_threads(1)
import torchlowrank.experiments.geolora_finetune as gf
from torchlowrank.experiments.training import encode_texts
from torchlowrank.data import load_rotten_tomatoes
from torchlowrank.models import load_minilm
spec = json.loads(sys.argv[1])
tok, base = load_minilm(num_labels=2, seed=0); base.eval()
for p in base.parameters(): p.requires_grad_(False)
data = load_rotten_tomatoes(seed=0)
g = torch.Generator().manual_seed(0)
tr = torch.randperm(len(data.train_labels), generator=g).tolist()[:512]
x_tr = encode_texts(tok, [data.train_texts[i] for i in tr], 32); y_tr = data.train_labels[tr]
torch.manual_seed(0)
cfg = gf.Config(seeds=(0,))
gc = dict(r=8, tau=0.01, rank_budget=gf.budget_parameters(cfg, base), target_modules=gf.TARGETS, modules_to_save=["classifier"])
gc.update(spec.get("cfg", {}))
if gc["tau"] == 0: gc.pop("rank_budget")
model = gf.adapt(copy.deepcopy(base), gf.GeoLoRAConfig(**gc))
opt = gf.geolora_optimizer(model, lr=spec["lr"], **spec.get("opt", {}))
for grp in opt.param_groups:
    if grp["unit"] is None: grp["lr"] = spec.get("head_lr", 1e-3)
lay = model.bert.encoder.layer[3].attention.self.value
gen = torch.Generator().manual_seed(0); order = torch.randperm(512, generator=gen); pos = 0
for step in range(spec.get("steps", 20)):
    idx = order[pos:pos+16]; pos += 16
    out = model(**{k: v[idx] for k, v in x_tr.items()}, labels=y_tr[idx]); out.loss.backward()
    u = lay.lora_unit
    # full gradient of the layer's weight: reconstruct G V from U.grad / s
    gS = u.S.grad.clone() if u.S.grad is not None else None
    opt.step(); opt.zero_grad(set_to_none=True)
    if gc["tau"] > 0: gf.rebalance_ranks(model, opt)
    st = opt.state[lay.lora_unit.U]
    v = st.get("exp_avg_sq"); m = st.get("exp_avg")
    print(f"step {step+1} loss {float(out.loss):.3f} gS {None if gS is None else [round(x,5) for x in gS.tolist()[:4]]} v {v.flatten()[:3].tolist() if v is not None and v.dim() else float(v) if v is not None else None} m_diag {[round(x,5) for x in torch.diagonal(m).tolist()[:4]]} |m| {float(m.norm()):.4g} S {[round(x,4) for x in u.S.tolist()[:4]]}", flush=True)
