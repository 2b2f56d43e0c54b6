"""Diagnosis probes (issue #19): one arm on MiniLM + Rotten Tomatoes, seed 0, the experiment's 512
training snippets, scored on 400 other training snippets (validation); logs the training loss,
||Delta W||_F (mean / max over the 24 matrices), layer 3's value-matrix singular values and the
total rank at steps 1, 5, 10, 30, 60, 96. The spec is JSON: arm (lora / adalora / geolora), lr,
steps, head_lr (the classifier's lr when it differs), warmup (linear, steps), cfg (GeoLoRAConfig
fields), opt (LowRankAdam arguments; second_moment "unit" unless given, the default when these
probes ran), s0 (a constant start for S).

PYTHONPATH=src python docs/results/geolora-finetune/probe_side_run.py '{"arm": "geolora", "lr": 1e-3}'
Output of the runs quoted in docs/reproductions/geolora-finetune.md: probe_side_run.txt.
"""

import copy
import json
import sys
import time

import torch

torch.set_num_threads(1)
import torchlowrank.experiments.geolora_finetune as gf
from torchlowrank.data import load_rotten_tomatoes
from torchlowrank.experiments.training import encode_texts, text_accuracy
from torchlowrank.models import load_minilm

spec = json.loads(sys.argv[1])
arm = spec.get("arm", "geolora")
steps = spec.get("steps", 96)
lr = spec.get("lr", 1e-3)
seed = 0
cfg = gf.Config(seeds=(0,), steps=steps)
tok, base = load_minilm(num_labels=2, seed=seed)
base.eval()
for p in base.parameters():
    p.requires_grad_(False)
data = load_rotten_tomatoes(seed=seed)
g = torch.Generator().manual_seed(seed)
tr = torch.randperm(len(data.train_labels), generator=g).tolist()
val, tr = tr[512:912], tr[:512]
x_tr = encode_texts(tok, [data.train_texts[i] for i in tr], 32)
y_tr = data.train_labels[tr]
x_va = encode_texts(tok, [data.train_texts[i] for i in val], 32)
y_va = data.train_labels[val]
torch.manual_seed(seed)
if arm == "geolora":
    gc = dict(
        r=8,
        tau=0.01,
        rank_budget=gf.budget_parameters(cfg, base),
        target_modules=gf.TARGETS,
        modules_to_save=["classifier"],
    )
    gc.update(spec.get("cfg", {}))
    if gc.get("tau", 0.01) == 0:
        gc.pop("rank_budget", None)
    model = gf.adapt(copy.deepcopy(base), gf.GeoLoRAConfig(**gc))
    s0 = spec.get("s0")
    if s0 is not None:
        from torchlowrank.adapters.model import adapter_layers

        for _, l in adapter_layers(model):
            l.lora_unit.S.data.fill_(s0)
    opt = gf.geolora_optimizer(model, lr=lr, **{"second_moment": "unit", **spec.get("opt", {})})
    if "head_lr" in spec:
        for grp in opt.param_groups:
            if grp["unit"] is None:
                grp["lr"] = spec["head_lr"]
else:
    model = {"lora": gf.lora_model, "adalora": gf.adalora_model}[arm](cfg, base)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    if "head_lr" in spec:
        opt = torch.optim.AdamW(
            [
                {
                    "params": [
                        p for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n
                    ]
                },
                {
                    "params": [
                        p for n, p in model.named_parameters() if p.requires_grad and "classifier" in n
                    ],
                    "lr": spec["head_lr"],
                },
            ],
            lr=lr,
            weight_decay=0.0,
        )


def dW_norms():
    out = []
    for n, m in model.named_modules():
        if arm == "geolora" and hasattr(m, "delta_matrix") and hasattr(m, "lora_unit"):
            out.append(float(m.delta_matrix().detach().norm()))
        elif (
            arm == "lora"
            and hasattr(m, "lora_B")
            and isinstance(getattr(m, "lora_B", None), torch.nn.ModuleDict)
            and "default" in m.lora_B
        ):
            out.append(
                float((m.lora_B["default"].weight @ m.lora_A["default"].weight).norm() * m.scaling["default"])
            )
    return out


gen = torch.Generator().manual_seed(seed)
model.train()
losses = []
order, pos = torch.randperm(512, generator=gen), 0
t0 = time.perf_counter()
log = []
for step in range(steps):
    if pos + 16 > 512:
        order, pos = torch.randperm(512, generator=gen), 0
    idx = order[pos : pos + 16]
    pos += 16
    out = model(**{k: v[idx] for k, v in x_tr.items()}, labels=y_tr[idx])
    wu = spec.get("warmup", 0)
    if wu:
        if step == 0:
            base_lrs = [grp["lr"] for grp in opt.param_groups]
        for grp, b in zip(opt.param_groups, base_lrs):
            grp["lr"] = b * min(1.0, (step + 1) / wu)
    out.loss.backward()
    opt.step()
    if arm == "adalora":
        model.base_model.update_and_allocate(step)
    opt.zero_grad(set_to_none=True)
    if arm == "geolora" and spec.get("budget", True) and gc.get("tau", 0.01) > 0:
        gf.rebalance_ranks(model, opt)
    losses.append(float(out.loss))
    if (step + 1) in (1, 5, 10, 30, 60, 96):
        d = dW_norms()
        extra = ""
        if arm == "geolora":
            u = model.bert.encoder.layer[3].attention.self.value.lora_unit
            extra = f" S(3.v)={[round(x, 4) for x in u.S.tolist()]} totrank={sum(gf.adapter_ranks(model).values())}"
        log.append(
            f"  step {step + 1}: loss10={sum(losses[-10:]) / len(losses[-10:]):.3f} dW mean={sum(d) / max(len(d), 1):.3f} max={max(d) if d else 0:.3f}{extra}"
        )
ms = 1000 * (time.perf_counter() - t0) / steps
acc = text_accuracy(model, x_va, y_va)
print(
    json.dumps(spec),
    f"VAL={acc:.4f} lossfirst10={sum(losses[:10]) / 10:.3f} losslast10={sum(losses[-10:]) / 10:.3f} ms={ms:.0f}",
)
print("\n".join(log), flush=True)
