"""Experiments that measure the paper's findings and whether the fixes pay off, on two tasks.

- :mod:`.fair` (with :mod:`.protocol`, :mod:`.fair_analysis`, :mod:`.fair_report`): the fair
  optimizer protocol: AdamW vs ClipAwareAdamW, each at its own validated lr, on held-out seeds.
- :mod:`.length_bias` (Prop. 1 in training): grpo vs dapo vs uniform, completion length of
  correct vs incorrect completions, and the advantage mass on whole-group prefixes.
- :mod:`.prefix_bias` (Prop. 1): net gradient on prefixes shared by a whole group, per preset.
- :mod:`.reward_scale` (Prop. 2): parameter distance between runs with rewards scaled by phi.
- :mod:`.overshoot` (Prop. 3): ratio drift past the clip region vs mu, each arm at its own lr.

The GRPO loop is :mod:`.loop` over the tasks of :mod:`.tasks`; :mod:`.grid` runs many
configurations resumably; :mod:`.stats` holds the statistics.  Protocols and results:
``benchmarks/README.md`` and ``benchmarks/results/``.
"""
