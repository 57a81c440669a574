"""The later records' training: Muon options, wall-clock schedules, WD taper, EMA, Parallel Muon.

GOLDEN values were computed with a throwaway script outside this repository that exec'd each
record's own `zeropower_via_newtonschulz5` + `Muon` (torch.compile removed) from the
openai/parameter-golf mirror @ 4908dc46f and ran 3 steps on the seeded matrices below
(CPU, torch 2.13):
  muoneq_r_1394       2026-04-05_SP8192_GPTQ-Embeddings_SDClip_Loop45x2 (#1394), row_normalize=True
                      (its per-matrix, fp32-momentum Muon; the wrapper decoded)
  polar_express_1787  2026-04-23_..._PolarNS_MinLR_FusedCE (#1787), banks (3, rows, cols), row_normalize=True
  banked_549          2026-03-23_LeakyReLU_LegalTTT_ParallelMuon (#549), banks, single process
pgolf's plain and parallel paths reproduce all three bit for bit (max |diff| 0.0). LR_GOLDEN and
WD_GOLDEN are #1787's `lr_mul(training_frac(step, elapsed_ms))` (warmdown_frac 0.75, min_lr 0.1,
600 s, GPTQ reserve 4 s) and #1729's `wd_mul` (0.70 -> x0.5) on GRID.
"""

from __future__ import annotations

import pytest
import torch

from pgolf.optim import Muon
from pgolf.schedule import EMA, Schedule

SHAPES = [(32, 16), (16, 32), (24, 24)]
L, STEPS = 3, 3
# fmt: off
GOLDEN = {
    "muoneq_r_1394": [(1.635281431016, -0.935978914313), (0.0945190161, 4.631094412704), (1.763450836464, 1.018703741982), (-1.862373531112, -1.758157060351), (-0.113125186428, -1.722416190038), (-1.522036469774, -3.039347421727), (0.138749117483, -0.129505928679), (-1.879106807079, -1.293059112366), (-0.58235985518, 3.033172991447)],  # noqa: E501
    "polar_express_1787": [(1.599759235221, -1.136463820381), (0.13291141676, 4.53017327527), (1.637536110997, 1.187499865366), (-1.876612103755, -1.684154435628), (-0.131443271042, -1.692086448973), (-1.561523408731, -3.112464764927), (0.213578842748, -0.21383716369), (-1.851706208574, -1.296232185327), (-0.61760446211, 3.052990032913)],  # noqa: E501
    "banked_549": [(1.689119507675, -1.038067424437), (0.161200754963, 4.617927257801), (1.847637590596, 1.014156470228), (-1.881165143568, -1.781678385989), (-0.131114734555, -1.657725452955), (-1.52738761605, -3.098251973104), (0.174813257123, -0.113314654125), (-1.893102338101, -1.363977401255), (-0.648165400024, 2.946288728359)],  # noqa: E501
}
OPTIONS = {
    "muoneq_r_1394": dict(row_normalize=True),
    "polar_express_1787": dict(row_normalize=True, ns_coefficients="polar_express", numerics="banked"),
    "banked_549": dict(numerics="banked"),
}
ELAPSED_MS = (0.0, 100000.0, 148999.0, 149000.0, 300000.0, 450000.0, 500000.0, 590000.0, 596000.0, 599000.0)
LR_GOLDEN = [1.0, 1.0, 1.0, 1.0, 0.662192393736, 0.326621923937, 0.214765100671, 0.1, 0.1, 0.1]
WD_GOLDEN = [1.0, 1.0, 1.0, 1.0, 1.0, 0.908277404922, 0.768456375839, 0.51677852349, 0.5, 0.5]
LR_ITERS_GOLDEN = {0: 1.0, 4000: 1.0, 5000: 1.0, 10000: 0.666666666667, 15000: 0.333333333333, 19000: 0.1, 20000: 0.1}
# fmt: on


def seeded_run(**options) -> list[tuple[float, float]]:
    g = torch.Generator().manual_seed(0)
    params = {s: [torch.nn.Parameter(torch.randn(s, generator=g) * 0.05) for _ in range(L)] for s in SHAPES}
    grads = [{s: [torch.randn(s, generator=g) for _ in range(L)] for s in SHAPES} for _ in range(STEPS)]
    opt = Muon([p for s in SHAPES for p in params[s]], lr=0.026, momentum=0.97, backend_steps=5, weight_decay=0.095,
               **options)
    for t in range(STEPS):
        for s in SHAPES:
            for p, grad in zip(params[s], grads[t][s]):
                p.grad = grad.clone()
        opt.step()
    out = []
    for s in SHAPES:
        for p in params[s]:
            w = torch.arange(p.numel(), dtype=torch.float64).view_as(p) % 7 - 3
            out.append((p.detach().double().sum().item(), (p.detach().double() * w).sum().item()))
    return out


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("case", GOLDEN)
def test_muon_step_equals_the_records(case, parallel):
    if parallel and OPTIONS[case].get("numerics") != "banked":
        pytest.skip("Parallel Muon is the banked records' design")
    got = seeded_run(**OPTIONS[case], parallel=parallel)
    flat = lambda pairs: [v for pair in pairs for v in pair]  # noqa: E731
    assert flat(got) == pytest.approx(flat(GOLDEN[case]), rel=0, abs=1e-10)


def test_options_change_the_step():
    base = seeded_run()
    assert seeded_run(row_normalize=True) != base
    assert seeded_run(ns_coefficients="polar_express") != base
    assert seeded_run(numerics="banked") != base


def test_lr_and_wd_multipliers_equal_the_records_on_a_grid():
    s = Schedule(warmdown_frac=0.75, min_lr=0.1, max_wallclock_seconds=600.0, gptq_reserve_seconds=4.0,
                 wd_taper_start_frac=0.70, wd_taper_final_mult=0.5)
    for step in (0, 100, 4000):
        assert [s.at(step, e).lr_mul for e in ELAPSED_MS] == pytest.approx(LR_GOLDEN, abs=1e-11)
        assert [s.at(step, e).wd_mul for e in ELAPSED_MS] == pytest.approx(WD_GOLDEN, abs=1e-11)
    uncapped = Schedule(warmdown_frac=0.75, min_lr=0.1, max_wallclock_seconds=0)
    assert {k: uncapped.lr_mul(k, 0.0) for k in LR_ITERS_GOLDEN} == pytest.approx(LR_ITERS_GOLDEN, abs=1e-11)
    assert s.budget_ms == 596000.0


def test_schedule_point_switches():
    s = Schedule(max_wallclock_seconds=100.0, warmdown_frac=0.5, ema_decay=0.99,
                 ema_start_frac=0.2, qat_start_frac=0.5)
    early, late = s.at(10, 10_000.0), s.at(90, 80_000.0)
    assert (early.frac, early.ema, early.qat) == (pytest.approx(0.1), False, False)
    assert (late.frac, late.ema, late.qat) == (pytest.approx(0.8), True, True) and late.lr_mul == pytest.approx(0.4)
    # min_lr also floors the warmdown_iters form
    assert Schedule(iterations=100, warmdown_iters=20, max_wallclock_seconds=0, min_lr=0.25).lr_mul(95, 0) == 0.25


def test_bad_schedule_and_muon_options_name_the_fix():
    from pgolf.errors import PgolfError

    with pytest.raises(PgolfError, match="swa_every"):
        Schedule(ema_decay=0.99, swa_every=50)
    with pytest.raises(PgolfError, match="gptq_reserve_seconds"):
        Schedule(max_wallclock_seconds=10.0, gptq_reserve_seconds=10.0)
    with pytest.raises(PgolfError, match="muon_backend_steps"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], lr=0.1, momentum=0.9, backend_steps=6,
             ns_coefficients="polar_express")
    with pytest.raises(PgolfError, match="ns_coefficients"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], lr=0.1, momentum=0.9, backend_steps=5, ns_coefficients="x")


def test_ema_is_the_records_fp32_shadow():
    model = torch.nn.Linear(3, 2).bfloat16()
    ema = EMA(0.9)
    ema.start(model)
    theta0 = {k: v.float().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    want = theta0["weight"].mul_(0.9).add_(model.weight.detach().float(), alpha=0.1)  # the records' update
    assert ema.shadow["weight"].dtype == torch.float32 and torch.equal(ema.shadow["weight"], want)
    assert ema.average(model.state_dict())["weight"].dtype == torch.bfloat16
    again = EMA(0.9)
    again.load_state_dict(ema.state_dict())
    assert torch.equal(again.shadow["weight"], ema.shadow["weight"]) and again.count == 1


def test_banked_momentum_stays_bf16_through_a_checkpoint():
    p = torch.nn.Parameter(torch.randn(8, 4))
    opt = Muon([p], lr=0.1, momentum=0.9, backend_steps=2, numerics="banked")
    p.grad = torch.randn(8, 4)
    opt.step()
    again = Muon([p], lr=0.1, momentum=0.9, backend_steps=2, numerics="banked")
    again.load_state_dict(opt.state_dict())
    assert again.state[p]["momentum_buffer"].dtype == torch.bfloat16


# ---------------------------------------------------------------- end to end
def test_ema_weights_are_what_gets_exported(tmp_path, fast_cache, monkeypatch):
    """final_model.pt is the EMA shadow (cast back), and the log reports both val_bpb values."""
    from runs import FAST

    import pgolf.trainer
    from pgolf.build import compose, train

    made: list[EMA] = []

    class Recorded(EMA):
        def __init__(self, decay):
            super().__init__(decay)
            made.append(self)

    monkeypatch.setattr(pgolf.trainer, "EMA", Recorded)
    cfg = compose([*FAST, fast_cache, "logger=none", "schedule.ema_decay=0.9", "schedule.warmdown_frac=0.5",
                   "schedule.min_lr=0.3", "optimizer.muon_row_normalize=true",
                   "optimizer.ns_coefficients=polar_express"])
    m = train(cfg, run_dir=tmp_path)
    (ema,) = made
    final = torch.load(tmp_path / "final_model.pt", weights_only=True)
    assert ema.count == 8 and m["train/ema_updates"] == 8
    assert all(torch.equal(final[k], v.to(final[k].dtype)) for k, v in ema.shadow.items())
    log = (tmp_path / "train.log").read_text()
    assert "ema:applying EMA shadow of 8 updates" in log and "pre_averaging_val_bpb:" in log
    assert m["final/pre_averaging_bpb"] != m["final/prequant_bpb"]
    assert "warmdown_frac:0.5 min_lr:0.3" in log and "row_normalize:True ns_coefficients:polar_expressx5" in log
    assert "lr_scale:0.3000" in log  # the floor took effect at the last step (frac 7/8 -> 0.25 -> 0.3)


@pytest.mark.slow
def test_parallel_muon_two_gloo_ranks_match_the_plain_path(tmp_path, fast_cache):
    """2 ranks, Parallel Muon (DDP skips the matrices; reduce-scatter, sharded NS, all-gather) ends
    with the weights of the plain path (DDP all-reduce, round-robin Muon) within float tolerance."""
    from runs import FAST, metrics, run_py

    finals = {}
    for parallel in ("plain", "parallel"):
        r = run_py([*FAST, fast_cache, "logger=none", f"optimizer.muon_parallel={parallel == 'parallel'}",
                    f"hydra.run.dir={parallel}"], tmp_path, torchrun=2)
        assert r.returncode == 0, r.stderr[-3000:]
        m = metrics(tmp_path / parallel)
        assert m["train/ranks_identical"] is True and m["world_size"] == 2
        finals[parallel] = torch.load(tmp_path / parallel / "final_model.pt", weights_only=True)
    assert "parallel:True" in (tmp_path / "parallel" / "train.log").read_text()
    for k, v in finals["plain"].items():
        torch.testing.assert_close(finals["parallel"][k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_ema_loader_and_banked_momentum_resume_exactly(tmp_path, fast_cache):
    """SIGTERM after step 5, resume: the EMA shadow, the shuffled loader's state and the bf16
    momentum come back, and the result equals a straight run bit for bit."""
    import os
    import signal
    import subprocess
    import sys

    from runs import FAST, ROOT

    import pgolf

    job = [*FAST, fast_cache, "schedule.iterations=12", "schedule.train_log_every=1", "logger=none",
           "schedule.ema_decay=0.9", "data.loader=shuffled", "optimizer.muon_numerics=banked",
           "optimizer.muon_row_normalize=true"]
    run_dir = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *job, f"hydra.run.dir={run_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("step:5/12 train_loss"):
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), *job, f"resume={run_dir}"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    straight = tmp_path / "straight"
    pgolf.train(pgolf.compose(job), run_dir=straight)
    a = torch.load(run_dir / "final_model.pt", weights_only=True)
    b = torch.load(straight / "final_model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_adam_groups_and_wd_taper_follow_the_records():
    """#1787's Adam setup (AdamW: embedding WD 0.085, scalars 0.02) and #1729's taper on Muon only."""
    from pgolf.model import GPT
    from pgolf.optim import Optimizers

    model = GPT(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2)
    opt = Optimizers(model, muon_weight_decay=0.095, embed_weight_decay=0.085, adam_weight_decay=0.02,
                     scalar_betas=[0.9, 0.99])
    assert type(opt.token).__name__ == "AdamW" and opt.token.defaults["weight_decay"] == 0.085
    assert type(opt.scalar).__name__ == "AdamW" and opt.scalar.defaults["weight_decay"] == 0.02
    assert opt.scalar.defaults["betas"] == (0.9, 0.99) and opt.token.defaults["betas"] == (0.9, 0.95)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step(0, 1.0, wd_mul=0.5)
    assert opt.muon.param_groups[0]["weight_decay"] == pytest.approx(0.0475)
    assert opt.token.param_groups[0]["weight_decay"] == 0.085


def test_the_pr1787_options_compose():
    from pgolf.build import build, compose

    cfg = compose(["optimizer=pr1787", "schedule=pr1787"])
    s = build(cfg, "schedule")
    assert (s.warmdown_frac, s.min_lr, s.ema_decay, s.budget_ms) == (0.75, 0.1, 0.9965, 592000.0)
    assert cfg.optimizer.ns_coefficients == "polar_express" and cfg.optimizer.muon_parallel is True
