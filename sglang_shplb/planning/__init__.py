"""The offline pipeline, one module per stage: :mod:`.profile` (per-head elasticity, with
:mod:`.calibration_data` and :mod:`.model_store`), :mod:`.budget`, :mod:`.cost_model`, :mod:`.place`
(with :mod:`.solvers`), :mod:`.report`, :mod:`.quality`; :mod:`.synthetic_plans` makes rule-based plans
for tests and benchmarks. The server never imports this package."""
