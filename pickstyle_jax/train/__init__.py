"""PickStyle LoRA training: frozen Wan2.1-VACE, LoRA on the VACE blocks, flow matching on motion clip pairs.

    python -m pickstyle_jax.train --config=configs/pickstyle.py --workdir=runs/x [--config.total_steps=100 ...]
    python -m pickstyle_jax.plan --config=configs/pickstyle.py --devices=32        # memory plan, no device needed

The flow, one module each (this file imports nothing, so `pickstyle_jax.train.config` loads without JAX):
  config.py         the config schema with the paper's values (ml_collections only; configs/*.py build on it)
  setup.py          checks, model configs, the caption table, `abstract_state` and `prepare` -> `TrainSetup`
  base.py           the frozen base: DiT and VAE loaded (or randomly initialised) into their shardings, E(0)
  step.py           the loss, the optimizer and the pure `train_step`, jitted with shardings and donation
  loop.py           the run: data, steps, metrics.jsonl, checkpoints, resume, signals, the LoRA export
  checkpointing.py  Orbax checkpoints of state + key + data iterator, signals, the LoRA export
  plan.py           the memory plan of the step on N simulated devices
  tensorboard.py    TensorBoard event files of the logged scalars, written without TensorFlow
  plot.py           loss.png: the loss curve drawn with numpy
"""
