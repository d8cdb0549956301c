"""Diagnose induction learning at gpu scale: KV shift 1 layer, naive vs fused shift, bf16 vs fp32."""
import sys, time, torch, torch.nn.functional as F
from kvshift.experiments.toy import INDUCTION, _cfg, _induction_sampler
from kvshift.models import LM
s = INDUCTION["gpu"]
samp = _induction_sampler(s)
g = torch.Generator().manual_seed(0)
batches = [samp(64, g) for _ in range(int(sys.argv[1]))]
for impl, bf16, lr in [("naive", True, 1e-3), ("auto", True, 1e-3), ("naive", False, 1e-3), ("naive", True, 3e-4)]:
    cfg = _cfg(s, "kvshift", 1).replace(shift_impl=impl)
    m = LM(cfg, seed=0).cuda()
    opt = torch.optim.AdamW(m.param_groups(0.1), lr=lr, betas=(0.9, 0.95))
    t0 = time.time(); out = []
    for i, (tok, mask) in enumerate(batches):
        for gr in opt.param_groups: gr["lr"] = lr * min(1, (i + 1) / 200)
        tok = tok.cuda(); mask = mask.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            lg = m(tok[:, :-1])
        loss = F.cross_entropy(lg.float().reshape(-1, 8000), tok[:, 1:].reshape(-1))
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step()
        if i % 50 == 49:
            acc = (lg[:, :-0 or None].argmax(-1) == tok[:, 1:])[mask[:, :-1]].float().mean().item()
            out.append(f"{i+1}:{loss.item():.2f}/{acc:.2f}")
    print(impl, bf16, lr, f"{time.time()-t0:.0f}s", " ".join(out), flush=True)
