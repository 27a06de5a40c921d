"""GPU-scale Fashion-MNIST, both phases in one command: public pretraining, then DP (epsilon 10).

    bash benchmarks/fmnist_gpu.sh            # one H200: train, sample, evaluate
    bash benchmarks/fmnist_gpu.sh --smoke    # the same chain on a CPU in minutes (`:smoke`)

The split, data and evaluation are those of configs/fashion_mnist_pretrain.py (6,000 public
images, 600 per class, `split_seed` 0; 54,000 private ones; the official test split), so its
results compare with the CPU runs of benchmarks/RESULTS.md section 6. What changes is the scale,
towards DPDM's (batch 4096, K = 32, 300 epochs, a 1.75M-parameter UNet):

* a DPDM-sized UNet: base width 32, channel_mult (1, 2, 2), 2 residual blocks per level,
  attention at 7x7: 1,744,289 parameters (the CPU configs: 300,641);
* phase 1 (`pretrain.*`, not private, in WORKDIR/pretrain): 2,000 steps of 256 public images
  (85 epochs), Adam 1e-3, EMA 0.999;
* phase 2 (DP-SGD on the private 54,000): expected batch 4096 (q = 0.0759), K = 16, C = 0.2
  (chosen on public data for the CPU configs' model; see configs/fashion_mnist.py),
  sigma calibrated (PLD) to (10, 1e-5)-DP over 60 steps (4.6 epochs), Adam 5e-4, EMA 0.99;
  256 examples per vmap call (the per-example gradients of a call take 256 x 1.74M x 4 bytes
  = 1.8 GB);
* 10,000 samples (1,000 per class), DDIM 50 steps, guidance 1.0; the downstream CNN as on CPU,
  and label consistency by the same CNN trained on the real training split.

Sizing (arithmetic from the H200 measurements, not a measurement of this config):
benchmarks/RESULTS.md section 9. Record the measured times there when it runs.

Variant `:smoke` (big_vision style, `jaxdpdm.recipes.parse_arg`): 12x12 images, a tiny UNet,
256 examples, 2 + 2 steps, 40 samples, for the CPU smoke test of the script
(tests/test_fmnist_gpu_script.py).
"""

from jaxdpdm.recipes import fashion_mnist_base, finetune_timesteps, parse_arg, shrink_for_smoke


def get_config(arg=None):
    variant = parse_arg(arg, name="fashion_mnist_gpu", smoke=False)
    config = fashion_mnist_base("private")
    config.phase = "dp"

    m = config.model
    m.base_channels = 32
    m.channel_mult = (1, 2, 2)
    m.num_res_blocks = 2
    m.attention_resolutions = (7,)
    m.num_heads = 2

    d = config.diffusion
    d.augmult = 16
    finetune_timesteps(config)

    p = config.pretrain
    p.num_steps = 2000
    p.batch_size = 256
    p.learning_rate = 1e-3
    p.warmup_steps = 100
    p.ema_decay = 0.999
    p.augmult = 1

    t = config.train
    t.num_steps = 60
    t.batch_size = 4096
    t.microbatch_size = 256
    t.learning_rate = 5e-4
    t.warmup_steps = 5
    t.ema_decay = 0.99
    t.log_every = 5
    t.checkpoint_every = 30
    t.grid_per_class = 10

    dp = config.dp
    dp.target_epsilon = 10.0
    dp.delta = 1e-5
    dp.clip_norm = 0.2
    dp.accountant = "pld"

    s = config.sample
    s.num_samples = 10000
    s.batch_size = 1000
    s.guidance_scale = 1.0

    e = config.eval
    e.label_classifier = "cnn"
    e.label_consistency_samples = 0  # --mode=evaluate scores all 10,000 samples

    if variant.smoke:
        shrink_for_smoke(config)
        config.model.num_res_blocks = 1
        config.pretrain.num_steps = 2
        config.pretrain.batch_size = 16
        config.pretrain.warmup_steps = 1
        config.train.checkpoint_every = 2
        config.eval.classifier_epochs = 1
    return config
