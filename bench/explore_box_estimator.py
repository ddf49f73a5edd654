"""Exploration (issue 11, not used by the meter): would a box estimator fix power-only GPUs whose
field 186 is a 100 ms point sample, on short jobs?

A 1 s trailing mean M read at every 100 ms refresh gives the differences of 100 ms box energies
one second apart: B_k - B_(k-10) = w (M_k - M_(k-1)). So the boxes are known up to one 1 s-periodic
pattern, which many seconds of point samples can pin down (their aliasing averages out) where
one second of samples cannot. This checks the idea on ideal data (means and samples at the
exact refresh instants, the edge kernel integrated numerically) against using the samples
alone, over 1.5 s windows at random phases on the robustness bench's loads. The meter's error
there is all in the edge kernel (E(t) = I(t + w/2) - K(t), the reference I is exact).

    python bench/explore_box_estimator.py      # ~2 min; prints p50/p90/max |error| % per load
"""
import sys, random, statistics
import os
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_robustness as BR
P, W, PH = 0.1, 1.0, BR.GRID_PHASE_S   # refresh period, mean window, grid phase (s)
def energy(tr, a, b):
    return tr.cumulative(b) - tr.cumulative(a)
def run(load, n=40, seed=1, N=8, mode="box"):
    tr = BR._trace(load, 400, "x")
    rng = random.Random(seed)
    errs = []
    for _ in range(n):
        t0 = rng.uniform(20, 300); t1 = t0 + 1.5
        truth = energy(tr, t0, t1)
        def E_est(t):
            # boxes around t: grid u_k = PH + k P
            k_t = int((t - PH) // P)
            # M and samples on grid
            M = lambda k: energy(tr, PH + k * P - W, PH + k * P) / W
            S = lambda k: tr.power_w(PH + k * P)          # the point sample at refresh k
            # box k = (u_{k-1}, u_k]; estimate from sample at its middle? use avg of its two end samples
            Bhat = lambda k: P * 0.5 * (S(k - 1) + S(k))
            boxes = {}
            for k in range(k_t - 6, k_t + 7):
                if mode == "samples":
                    boxes[k] = Bhat(k); continue
                # B_k = B_{k-10m} + W * sum_{i<m} (M_{k-10i} - M_{k-10i-1})
                ests = []
                acc = 0.0
                for m in range(N):
                    kk = k - 10 * m
                    ests.append(Bhat(kk) + acc)
                    acc += W * (M(kk) - M(kk - 1))
                boxes[k] = sum(ests) / len(ests)
            # E(t) relative: I(t+h) - K(t). I(t+h) = int of M up to t+h; use exact I via truth identity:
            # E(t) = Ebar_w(t) - K(t) where Ebar=I(t+h) exact; so error comes only from K. K(t)=int P(t+x)k(x)
            h = W / 2
            K = 0.0
            steps = 400
            for i in range(steps):
                x = -h + (i + 0.5) * (W / steps)
                s = t + x
                kk = int((s - PH) // P) + 1       # box (u_{kk-1}, u_kk] containing s
                p = boxes.get(kk, 0.0) / P
                kx = -(h + x) / W if x <= 0 else (h - x) / W
                K += p * kx * (W / steps)
            # true K
            Kt = 0.0
            for i in range(steps):
                x = -h + (i + 0.5) * (W / steps)
                s = t + x
                kx = -(h + x) / W if x <= 0 else (h - x) / W
                Kt += energy(tr, s - W/steps/2, s + W/steps/2) / (W/steps) * kx * (W / steps)
            return K - Kt     # error in K at t (E error = -(K - Kt))
        err = -(E_est(t1) - E_est(t0))
        errs.append(100 * err / truth)
    a = sorted(abs(e) for e in errs)
    return statistics.median(a), a[int(0.9 * (len(a) - 1))], a[-1]
for load in ["sq200_locked", "sq100_jitter", "sq200_jitter", "sq400_locked", "sq400_jitter", "sq1000_jitter", "ramp_spikes"]:
    for mode in ("samples", "box"):
        print(load, mode, "p50 %.2f p90 %.2f max %.2f" % run(load, mode=mode), flush=True)
