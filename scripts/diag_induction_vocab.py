"""CPU diagnostic: KV shift 1 layer on induction, 300 steps; vocabulary 512 vs 8000, untied vs tied
embeddings. Usage: python scripts/diag_induction_vocab.py a_v512|b_v8000|c_v8000_tied"""
import sys, time, torch
from kvshift.experiments.toy import _cfg, _induction_sampler
from kvshift.experiments.common import Arm, DataStream, TrainSpec, train_arm
torch.set_num_threads(1)
name = sys.argv[1]
base = dict(vocab=512, seq=128, pool=128, dim=128, heads=4, ffn=352)
variants = {"a_v512": {}, "b_v8000": dict(vocab=8000), "c_v8000_tied": dict(vocab=8000)}
s = {**base, **variants[name]}
cfg = _cfg(s, "kvshift", 1)
if name.endswith("tied"):
    cfg = cfg.replace(tie_embeddings=True)
samp = _induction_sampler(s)
ev = samp(64, torch.Generator().manual_seed(5))
spec = TrainSpec(steps=300, batch_size=32, lr=1e-3, warmup=100, eval_every=50)
st = DataStream(samp, 32, 300, seed=0, workers=1)
t0 = time.time()
r = train_arm(Arm(name, cfg), st, ev, spec, init_seed=0, device=torch.device("cpu"),
              log=lambda r: print(name, r["step"], round(r["accuracy"], 3), flush=True) if r.get("eval") else None, progress=False)
print(name, "final", r["final_accuracy"], f"{time.time()-t0:.0f}s", flush=True)
