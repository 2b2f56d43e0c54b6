# Q3R-only arm of q3r-finetune (same data/steps/seed as the full run) at other lam values.
import copy, sys, tempfile, torch
from pathlib import Path
from torchlowrank.experiments import q3r_finetune as q
from torchlowrank.data import load_rotten_tomatoes
from torchlowrank.models import load_minilm
from torchlowrank.regularizers import Q3R
from torchlowrank.reproducibility import one_thread
n_train, n_test, max_len, steps, batch, rank, lr, seed = 512, 400, 32, 96, 16, 8, 1e-4, 0
with one_thread():
    tok, base = load_minilm(2, seed); base.eval()
    data = load_rotten_tomatoes(seed=seed)
    g = torch.Generator().manual_seed(seed)
    tr = torch.randperm(len(data.train_labels), generator=g)[:n_train].tolist()
    te = torch.randperm(len(data.test_labels), generator=g)[:n_test].tolist()
    x_tr = q._encode(tok, [data.train_texts[i] for i in tr], max_len); y_tr = data.train_labels[tr]
    x_te = q._encode(tok, [data.test_texts[i] for i in te], max_len); y_te = data.test_labels[te]
    for p in base.parameters(): p.requires_grad_(False)
    for lam in [float(a) for a in sys.argv[1:]]:
        model = copy.deepcopy(base); params = q._set_full_finetune(model)
        reg = Q3R(model, rank, lam, period=5, targets=q.TARGETS, update=True, seed=seed)
        q._train(model, params, x_tr, y_tr, steps=steps, batch=batch, lr=lr, seed=seed, reg=reg)
        with tempfile.TemporaryDirectory() as tmp:
            served = q.served_by_peft(base, q.adapter_from_update(base, model, rank), Path(tmp) / "a")
            print(f"lam={lam}: accuracy {q._accuracy(model, x_te, y_te):.4f}, adapter served by peft "
                  f"{q._accuracy(served, x_te, y_te):.4f}, update tail energy {q.update_tail_energy(base, model, rank):.4f}", flush=True)
