"""The probe's phases, in the order a run goes through them.

One name per step of the algorithm, shared by the probe's clock (`provenance/phase_seconds`, `memory/phases`),
the memory planner (`python -m probe_dist.plan`) and `bench/`.
"""

SAMPLE = "sample"                    # draw E and U at θ
SCORE_BASE = "score_base"            # S, h, T on E at θ (no grad)
UPDATE_GRADIENT = "update_gradient"  # streamed ∇L_U and the AdamW update vector u
DELTA_H1 = "delta_h1"                # the first-order prediction δH₁ = η ∇Ĥ·u
EXPLAIN = "explain"                  # per-sequence decompositions, curvature, the Cui proxy (forward mode)
SWEEP = "sweep"                      # ΔH_true(η) by SNIS for every η

PHASES = (SAMPLE, SCORE_BASE, UPDATE_GRADIENT, DELTA_H1, EXPLAIN, SWEEP)
