"""Experiments that measure the paper's three findings and show the fixes removing them.

- :mod:`.prefix_bias`  (Prop. 1): net gradient on prefixes shared by a whole group, per preset.
- :mod:`.reward_scale` (Prop. 2): parameter distance between runs with rewards scaled by phi.
- :mod:`.overshoot`    (Prop. 3): ratio drift past the clip region vs inner steps, per optimizer.
- :mod:`.lr_robustness` (Prop. 3 at large steps): collapsed runs vs learning rate, per optimizer.

Protocols and results: ``benchmarks/README.md`` and ``benchmarks/results/``.
"""
