"""The sharded training engine: mesh + logical-axis rules (partitioning), optimizer (optim), sharded train
state (state), the jit-ed step with gradient accumulation (step), orbax checkpoints (checkpoints), the loop
(loop.train), YAML configs (config) (the `rdr-jax train` command is rdr_jax/commands/train.py).

Entry point: ``rdr_jax.training.loop.train(rdr_jax.training.config.load_config(path, overrides))``.
"""
