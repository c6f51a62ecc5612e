"""Fused kernels of the loop math (the gate plugin, ``plugins/loop_gate/``) and their Python entry points."""
