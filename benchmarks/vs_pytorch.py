"""jaxdpdm against PyTorch on the same machine: five training steps of the same UNet, side by side.

    pip install -e ".[bench]"        # torch and opacus
    python benchmarks/vs_pytorch.py --image-size=16,28 --batch=64 --augmult=4 --repeats=15

Every step trains the same architecture (a PyTorch port of `jaxdpdm.models.unet`, parameter count
asserted equal) on the same per-example diffusion loss: K = --augmult draws of (timestep, noise)
per example, eps-MSE averaged over the K draws *before* any per-example gradient is taken, label
dropout 0.1 once per example, dropout as in the preset, Adam, float32. The five steps:

* `jax_dp`: `jaxdpdm.parallel.make_dp_step` (vmap(grad) over examples, clip, sum, one noise
  draw, Adam), the whole batch in one microbatch (`--jax-microbatch` to change it);
* `jax_nonprivate`: the gradient of the summed loss (one batched backward), then Adam;
* `torch_nonprivate`: the same, in PyTorch (the K draws of all examples as one batch);
* `torch_func_dp`: `torch.func.vmap(grad(...))` over examples, each example's K draws inside,
  then clip, sum, Gaussian noise, division by the batch size, Adam;
* `opacus_dp`: Opacus's per-sample gradient hooks (`GradSampleModule`) on the batch of B*K draws,
  the K rows of each example summed into its gradient, then Opacus's `DPOptimizer` (clip, sum,
  noise, Adam).

The steps are timed interleaved (one of each per repeat, after a warm-up step each), so a load
change hits all of them alike; medians are reported with the load average, then the ratios.
PyTorch uses its default intra-op threads (printed). Random inputs: timing does not depend on
pixel values. Without torch (or opacus) installed the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__":  # run as a script: use the jaxdpdm of this checkout
    sys.path.insert(0, os.path.dirname(_HERE))
if _HERE not in sys.path:  # dp_step and harness sit next to this file (not an installed package)
    sys.path.insert(0, _HERE)
import dp_step  # noqa: E402
import harness  # noqa: E402
from jaxdpdm.models import layers, unet  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:
    torch = None
try:
    import opacus
except ImportError:
    opacus = None

CLIP_NORM = dp_step.CLIP_NORM
NOISE_MULTIPLIER = dp_step.NOISE_MULTIPLIER
LABEL_DROPOUT = 0.1
STEPS = ("jax_dp", "jax_nonprivate", "torch_nonprivate", "torch_func_dp", "opacus_dp")

if torch is not None:

    def group_norm(channels: int) -> nn.GroupNorm:
        return nn.GroupNorm(layers.group_norm_groups(channels), channels, eps=1e-5)

    def conv3x3(cin: int, cout: int, *, zero: bool = False, stride: int = 1) -> nn.Conv2d:
        conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        if zero:
            nn.init.zeros_(conv.weight)
        return conv

    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0):
        """`layers.timestep_embedding` in PyTorch: `[B]` -> `[B, dim]`."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) /
                          max(half, 1))
        args = t.float()[:, None] * freqs[None, :]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return F.pad(emb, (0, 1)) if dim % 2 else emb

    class ResBlock(nn.Module):
        """`layers.ResBlock` (scale-shift norm, zero-initialised last conv), NCHW."""

        def __init__(self, cin: int, cout: int, embed_dim: int, dropout: float, *, up: bool = False,
                     down: bool = False):
            super().__init__()
            self.up, self.down = up, down
            self.in_norm, self.in_conv = group_norm(cin), conv3x3(cin, cout)
            self.emb_proj = nn.Linear(embed_dim, 2 * cout)
            self.out_norm, self.out_conv = group_norm(cout), conv3x3(cout, cout, zero=True)
            self.dropout = nn.Dropout(dropout)
            self.skip_proj = nn.Conv2d(cin, cout, 1) if cin != cout else None

        def forward(self, x, emb):
            h = F.silu(self.in_norm(x))
            if self.up:
                h, x = F.interpolate(h, scale_factor=2.0), F.interpolate(x, scale_factor=2.0)
            elif self.down:
                h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
            h = self.in_conv(h)
            scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
            h = self.out_conv(self.dropout(F.silu(h)))
            return (x if self.skip_proj is None else self.skip_proj(x)) + h

    class AttentionBlock(nn.Module):
        """`layers.AttentionBlock`: multi-head self-attention over H*W, residual, NCHW."""

        def __init__(self, channels: int, num_heads: int):
            super().__init__()
            self.num_heads = num_heads
            self.norm = group_norm(channels)
            self.qkv = nn.Linear(channels, 3 * channels)
            self.proj_out = nn.Linear(channels, channels)
            nn.init.zeros_(self.proj_out.weight)

        def forward(self, x):
            b, c, height, width = x.shape
            head_dim = c // self.num_heads
            h = self.norm(x).reshape(b, c, height * width).transpose(1, 2)
            qkv = self.qkv(h).reshape(b, height * width, 3, self.num_heads, head_dim)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
            out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v)
            out = self.proj_out(out.reshape(b, height * width, c))
            return x + out.transpose(1, 2).reshape(b, c, height, width)

    class Resample(nn.Module):
        """`layers.Downsample` / `layers.Upsample` (conv or parameter-free)."""

        def __init__(self, channels: int, *, up: bool, use_conv: bool):
            super().__init__()
            self.up = up
            self.conv = None
            if use_conv:
                self.conv = conv3x3(channels, channels, stride=1 if up else 2)

        def forward(self, x):
            if self.up:
                x = F.interpolate(x, scale_factor=2.0)
                return x if self.conv is None else self.conv(x)
            return F.avg_pool2d(x, 2) if self.conv is None else self.conv(x)

    class TorchUNet(nn.Module):
        """`jaxdpdm.models.unet.UNet(config)` in PyTorch (NCHW), block for block."""

        def __init__(self, cfg: unet.UNetConfig):
            super().__init__()
            self.cfg = cfg
            emb_dim, base = cfg.embed_dim, cfg.base_channels
            self.time_embed_0 = nn.Linear(base, emb_dim)
            self.time_embed_1 = nn.Linear(emb_dim, emb_dim)
            self.label_embed = (None if cfg.num_classes is None else nn.Embedding(
                cfg.num_classes + 1, emb_dim))
            self.in_conv = conv3x3(cfg.in_channels, base * cfg.channel_mult[0])
            self.blocks = nn.ModuleDict()
            block = lambda cin, cout, **kw: ResBlock(cin, cout, emb_dim, cfg.dropout, **kw)
            width, skip_widths = base * cfg.channel_mult[0], [base * cfg.channel_mult[0]]
            for level, (mult, res) in enumerate(zip(cfg.channel_mult, cfg.level_resolutions)):
                for i in range(cfg.num_res_blocks):
                    self.blocks[f"down_{level}_block_{i}"] = block(width, base * mult)
                    width = base * mult
                    if res in cfg.attention_resolutions:
                        self.blocks[f"down_{level}_attn_{i}"] = AttentionBlock(width, cfg.num_heads)
                    skip_widths.append(width)
                if level < cfg.num_levels - 1:
                    self.blocks[f"down_{level}_resample"] = (block(
                        width, width, down=True) if cfg.resblock_updown else Resample(
                            width, up=False, use_conv=cfg.conv_resample))
                    skip_widths.append(width)
            self.blocks["middle_block_0"] = block(width, width)
            self.blocks["middle_attn"] = AttentionBlock(width, cfg.num_heads)
            self.blocks["middle_block_1"] = block(width, width)
            for level in reversed(range(cfg.num_levels)):
                mult, res = cfg.channel_mult[level], cfg.level_resolutions[level]
                for i in range(cfg.num_res_blocks + 1):
                    self.blocks[f"up_{level}_block_{i}"] = block(width + skip_widths.pop(),
                                                                 base * mult)
                    width = base * mult
                    if res in cfg.attention_resolutions:
                        self.blocks[f"up_{level}_attn_{i}"] = AttentionBlock(width, cfg.num_heads)
                if level > 0:
                    self.blocks[f"up_{level}_resample"] = (block(
                        width, width, up=True) if cfg.resblock_updown else Resample(
                            width, up=True, use_conv=cfg.conv_resample))
            self.out_norm = group_norm(width)
            self.out_conv = conv3x3(width, cfg.in_channels, zero=True)

        def forward(self, x, t, y):
            """x `[B, C, H, W]`, t `[B]`, y int `[B]` -> eps `[B, C, H, W]`."""
            cfg = self.cfg
            emb = self.time_embed_0(timestep_embedding(t, cfg.base_channels))
            emb = self.time_embed_1(F.silu(emb))
            if self.label_embed is not None:
                emb = emb + self.label_embed(y)
            h = self.in_conv(x)
            skips = [h]
            for name, module in self.blocks.items():
                if name.startswith("up_") and "_block_" in name:
                    h = torch.cat([h, skips.pop()], dim=1)
                h = module(h, emb) if isinstance(module, ResBlock) else module(h)
                if name.startswith("down_") and "_attn_" not in name:
                    # The skip of a block is taken after its attention (if any): see below.
                    skips.append(h)
                elif name.startswith("down_") and "_attn_" in name:
                    skips[-1] = h
            return self.out_conv(F.silu(self.out_norm(h)))

    class Diffusion:
        """The per-example training draws and loss of `jaxdpdm.diffusion.per_example_loss`."""

        def __init__(self, cfg: unet.UNetConfig, augmult: int, num_timesteps: int = 1000):
            self.cfg, self.augmult, self.num_timesteps = cfg, augmult, num_timesteps
            betas = torch.linspace(1e-4, 0.02, num_timesteps, dtype=torch.float64)
            acp = torch.cumprod(1.0 - betas, 0)
            self.sqrt_acp = acp.sqrt().float()
            self.sqrt_1m_acp = (1.0 - acp).sqrt().float()

        def draws(self, images, labels):
            """images `[B, C, H, W]`, labels `[B]` -> x_t, t, y, noise with K rows per example
            (`[B, K, ...]`); label dropout once per example, as in jaxdpdm."""
            b, k = images.shape[0], self.augmult
            t = torch.randint(0, self.num_timesteps, (b, k))
            noise = torch.randn((b, k) + images.shape[1:])
            x_t = (self.sqrt_acp[t][..., None, None, None] * images[:, None] +
                   self.sqrt_1m_acp[t][..., None, None, None] * noise)
            dropped = torch.rand(b) < LABEL_DROPOUT
            y = torch.where(dropped, torch.full_like(labels, self.cfg.num_classes), labels)
            return x_t, t, y[:, None].expand(b, k), noise


def _clip_sum_noise(per_example: dict, batch: int):
    """Clip each example's gradient (dict of `[B, ...]`) to CLIP_NORM, sum, add noise, / B."""
    norms = torch.sqrt(sum(g.reshape(batch, -1).square().sum(1) for g in per_example.values()))
    factor = (CLIP_NORM / (norms + 1e-6)).clamp(max=1.0)
    out = {}
    for name, g in per_example.items():
        total = torch.einsum("b,b...->...", factor, g)
        out[name] = (total + NOISE_MULTIPLIER * CLIP_NORM * torch.randn_like(total)) / batch
    return out


def torch_steps(cfg: unet.UNetConfig, batch: int, augmult: int, seed: int = 0) -> dict:
    """`{name: step()}` for the three PyTorch steps, each with its own model and Adam."""
    torch.manual_seed(seed)
    diffusion = Diffusion(cfg, augmult)
    data = dp_step.synthetic_batch(cfg, batch, seed)
    images = torch.from_numpy(data["image"]).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(data["label"]).long()
    shape = images.shape[1:]

    def nonprivate():
        model = TorchUNet(cfg).train()
        optim = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step():
            x_t, t, y, noise = diffusion.draws(images, labels)
            eps = model(x_t.reshape((-1,) + shape), t.reshape(-1), y.reshape(-1))
            loss = F.mse_loss(eps, noise.reshape((-1,) + shape))
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()

        return model, step

    def func_dp():
        model = TorchUNet(cfg).train()
        optim = torch.optim.Adam(model.parameters(), lr=1e-4)
        params = dict(model.named_parameters())

        def example_loss(p, x_t, t, y, noise):  # one example: its K draws
            eps = torch.func.functional_call(model, p, (x_t, t, y))
            return F.mse_loss(eps, noise)

        per_example_grad = torch.func.vmap(torch.func.grad(example_loss),
                                           in_dims=(None, 0, 0, 0, 0), randomness="different")

        def step():
            x_t, t, y, noise = diffusion.draws(images, labels)
            detached = {k: v.detach() for k, v in params.items()}
            grads = _clip_sum_noise(per_example_grad(detached, x_t, t, y, noise), batch)
            for name, p in params.items():
                p.grad = grads[name]
            optim.step()

        return model, step

    def opacus_dp():
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer
        model = GradSampleModule(TorchUNet(cfg).train(), loss_reduction="sum")
        optim = DPOptimizer(torch.optim.Adam(model.parameters(), lr=1e-4),
                            noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=CLIP_NORM,
                            expected_batch_size=batch, loss_reduction="mean")

        def step():
            x_t, t, y, noise = diffusion.draws(images, labels)
            eps = model(x_t.reshape((-1,) + shape), t.reshape(-1), y.reshape(-1))
            # Sum over examples of each example's mean over its K draws and pixels.
            loss = F.mse_loss(eps, noise.reshape((-1,) + shape),
                              reduction="sum") / (augmult * shape.numel())
            optim.zero_grad(set_to_none=True)
            loss.backward()
            for p in model.parameters():  # B*K per-row gradients -> B per-example gradients
                p.grad_sample = p.grad_sample.reshape((batch, augmult) + p.shape).sum(1)
            optim.step()

        return model, step

    steps = {"torch_nonprivate": nonprivate(), "torch_func_dp": func_dp()}
    if opacus is not None:
        steps["opacus_dp"] = opacus_dp()
    return steps


def torch_parameter_count(cfg: unet.UNetConfig) -> int:
    return sum(p.numel() for p in TorchUNet(cfg).parameters())


_TOP_LEVEL = {"time_embed_0", "time_embed_1", "label_embed", "in_conv", "out_norm", "out_conv"}


def torch_name(path: tuple[str, ...]) -> str:
    """The TorchUNet parameter name of a flax parameter path, e.g.
    ("down_0_block_0", "in_norm", "norm", "scale") -> "blocks.down_0_block_0.in_norm.weight"."""
    *modules, leaf = path
    if modules[-1] == "norm" and len(modules) > 1:  # layers.GroupNorm wraps flax's as "norm"
        modules = modules[:-1]
    prefix = [] if modules[0] in _TOP_LEVEL else ["blocks"]
    return ".".join(prefix + modules + ["bias" if leaf == "bias" else "weight"])


def load_flax_params(model: "TorchUNet", params) -> None:
    """Copies jaxdpdm UNet parameters into `model` (HWIO kernels -> OIHW, Dense [in, out] ->
    Linear [out, in]); every parameter of both sides is matched exactly once."""
    import numpy as np
    from flax.traverse_util import flatten_dict
    torch_params = dict(model.named_parameters())
    flat = flatten_dict(params)
    if sorted(torch_name(p) for p in flat) != sorted(torch_params):
        raise ValueError("the flax and PyTorch parameter names do not match one to one")
    with torch.no_grad():
        for path, value in flat.items():
            value = np.asarray(value)
            if path[-1] == "kernel":
                value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
            torch_params[torch_name(path)].copy_(torch.from_numpy(np.ascontiguousarray(value)))


def jax_steps(cfg: unet.UNetConfig, batch: int, augmult: int, microbatch: int) -> tuple[dict, int]:
    """`({name: step()}, parameter count)` for the two jaxdpdm steps (`dp_step.Bench`)."""
    bench = dp_step.Bench(cfg, augmult=augmult, chunk_rows=batch)
    return ({
        "jax_dp": bench.stepper("dp", microbatch)[0],
        "jax_nonprivate": bench.stepper("nonprivate", batch)[0]
    }, bench.num_params)


RATIOS = (("jax_dp", "torch_func_dp"), ("jax_dp", "opacus_dp"),
          ("jax_nonprivate", "torch_nonprivate"), ("jax_dp", "jax_nonprivate"),
          ("torch_func_dp", "torch_nonprivate"), ("opacus_dp", "torch_nonprivate"))


def run_size(args: argparse.Namespace, image_size: int) -> dict:
    """Builds the five steps at one image size and times them; returns a JSON-able dict."""
    cfg = dp_step.model_config(args.preset, image_size, "float32")
    if args.conv_impl is not None:
        cfg = dataclasses.replace(cfg, conv_impl=args.conv_impl)
    load_before = os.getloadavg()
    steps, jax_params = jax_steps(cfg, args.batch, args.augmult, args.jax_microbatch)
    torch_models = torch_steps(cfg, args.batch, args.augmult)
    torch_params = torch_parameter_count(cfg)
    if torch_params != jax_params:
        raise AssertionError(f"PyTorch port has {torch_params} parameters, jaxdpdm {jax_params}")
    steps.update({name: step for name, (_, step) in torch_models.items()})
    times = harness.time_interleaved(steps, args.repeats)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    ratios = {
        f"{a}/{b}": medians[a] / medians[b] for a, b in RATIOS if a in medians and b in medians
    }
    return {
        "image_size": image_size, "num_params": jax_params, "medians_s": medians, "times_s": times,
        "ratios": ratios, "loadavg": [round(x, 2) for x in load_before + os.getloadavg()]
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=unet.PRESET_NAMES, default="cpu_small")
    parser.add_argument("--image-size", type=harness.int_list, default=[16, 28],
                        help="image sizes, comma-separated")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--augmult", type=int, default=4, help="K draws per example")
    parser.add_argument("--jax-microbatch", type=int, default=None,
                        help="microbatch of the jaxdpdm DP step (default: the batch)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--conv-impl", choices=layers.CONV_IMPLS, default=None,
                        help="jaxdpdm's UNetConfig.conv_impl (default: the UNet's default)")
    parser.add_argument("--json-out", default=None, help="also write the JSON result here")
    args = parser.parse_args(argv)
    args.jax_microbatch = args.jax_microbatch or args.batch
    if min(args.batch, args.augmult, args.repeats, args.jax_microbatch) < 1:
        parser.error("--batch, --augmult, --repeats and --jax-microbatch must be >= 1")
    if args.batch % args.jax_microbatch:
        parser.error(f"--batch={args.batch} is not a multiple of --jax-microbatch")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if torch is None:
        print("vs_pytorch: torch is not installed (pip install -e '.[bench]'); nothing to compare")
        return None
    if opacus is None:
        print("vs_pytorch: opacus is not installed; the Opacus step is left out")
    env = harness.environment()
    env.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
               opacus=getattr(opacus, "__version__",
                              None), xla_flags=os.environ.get("XLA_FLAGS", ""))
    conv_impl = args.conv_impl or unet.UNetConfig.conv_impl
    print(
        f"{args.preset}, batch {args.batch}, K={args.augmult}, float32, Adam; median of "
        f"{args.repeats} interleaved repeats; jax {env['jax']}, torch {env['torch']} "
        f"({env['torch_threads']} threads), opacus {env['opacus']}; "
        f"XLA_FLAGS={env['xla_flags']!r}; conv_impl {conv_impl}", flush=True)
    results = []
    for size in args.image_size:  # each size printed when done: a long run keeps what it has
        r = run_size(args, size)
        results.append(r)
        print(f"\n{r['image_size']}x{r['image_size']} ({r['num_params']:,} params), load average "
              f"before {r['loadavg'][:3]} after {r['loadavg'][3:]}")
        for name in STEPS:
            if name in r["medians_s"]:
                ts = r["times_s"][name]
                print(
                    f"  {name:<17}{r['medians_s'][name]:8.3f} s  (min {min(ts):.3f}, "
                    f"max {max(ts):.3f})", flush=True)
    print("\nratios (median / median; < 1 means the left one is faster):")
    for r in results:
        print(f"  {r['image_size']}x{r['image_size']}: " +
              ", ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items()))
    result = {
        "benchmark": "vs_pytorch", "argv": sys.argv[1:] if argv is None else list(argv),
        "preset": args.preset, "conv_impl": conv_impl, "batch": args.batch, "augmult": args.augmult,
        "jax_microbatch": args.jax_microbatch, "environment": env, "results": results
    }
    harness.emit_json(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
