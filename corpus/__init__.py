"""Applications on the engine: decontamination, the single-frame probe, the run report,
split, reward and the exporters' shared code. They use vkr_core; vkr_core never uses them."""
