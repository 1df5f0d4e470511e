"""Named MQAR sweeps.  Every value can be overridden from the command line (``palimpsa mqar --help``).

quick    the default: Palimpsa (one importance gate per value channel, and palimpsa_g1: one per head) vs
         NotPalimpsa on the CPU in under 10 minutes on 2 cores (L=64, 16 pairs, d_model 64, 4 heads of K=8, V=16,
         vocabulary 128, 1,000 steps of 32, seeds 0 and 1), a size where the model without metaplasticity is
         capacity-limited, so the comparison means something.
paper    the paper's sweep (spec benchmarks.md section 2): (L, kv) in {(512, 128), (1024, 256)}, d_model 128,
         2 layers, 8 heads, 100k train / 3k test, batch 128 / 64, 60 epochs, 4 learning rates, 8 seeds.
zoology  Zoology's figure 2 grid, as we read its configs: (64, 4), (128, 8), (256, 16), (512, 64);
         d_model 64-512; lr logspace(-4, -2, 4); batch 256/256/128/64; 64 epochs.
"""

from __future__ import annotations

from palimpsa.mqar.sweep import SweepGrid

PAPER_MODELS = ("palimpsa", "notpalimpsa", "meta_mamba2", "mamba2", "gated_deltanet")
ALL_MODELS = PAPER_MODELS + ("attention",)

PRESETS = {
    "quick": dict(
        # measured on 2 shared CPU cores (results/mqar/quick/CARD.md): 316 s for the 6 runs; at this size
        # NotPalimpsa reaches 51-63% in 1,000 steps against 97-100% with a 4x larger state (K=16, V=32)
        models=["palimpsa", "palimpsa_g1", "notpalimpsa"],
        settings=[(64, 16)],
        d_models=[64],
        lrs=[1e-2],
        seeds=[0, 1],
        fixed=dict(num_heads=4, head_k_dim=8, head_v_dim=16, vocab_size=128, num_train=32_768,
                   num_validation=256, num_test=512, batch_size=32, epochs=1, max_steps=1000, eval_every=200,
                   warmup_steps=50),
        workers_per_device=2,  # the two runs side by side, one CPU thread each
    ),
    "paper": dict(
        models=list(PAPER_MODELS),
        settings=[(512, 128), (1024, 256)],
        d_models=[128],
        lrs=[1e-3, 2.15e-3, 4.64e-3, 1e-2],
        seeds=list(range(8)),
        fixed=dict(num_heads=8, vocab_size=8192, num_train=100_000, num_validation=1_000, num_test=3_000,
                   epochs=60, batch_size=128),
        batch_size_by_seq_len={512: 128, 1024: 64},
    ),
    "zoology": dict(
        models=list(ALL_MODELS),
        settings=[(64, 4), (128, 8), (256, 16), (512, 64)],
        d_models=[64, 128, 256, 512],
        lrs=[1e-4, 4.64e-4, 2.15e-3, 1e-2],
        seeds=[0],
        fixed=dict(num_heads=8, vocab_size=8192, num_train=100_000, num_validation=1_000, num_test=3_000,
                   epochs=64, batch_size=64),
        batch_size_by_seq_len={64: 256, 128: 256, 256: 128, 512: 64},
    ),
}


def preset_workers_per_device(name: str) -> int:
    """Worker processes per device the preset runs with unless told otherwise."""
    return PRESETS[name].get("workers_per_device", 1)


def preset_grid(name: str) -> SweepGrid:
    """The SweepGrid of preset ``name`` (a fresh copy)."""
    if name not in PRESETS:
        raise ValueError(f"unknown MQAR preset {name!r}; choose one of {sorted(PRESETS)}")
    spec = PRESETS[name]
    return SweepGrid(
        models=list(spec["models"]), settings=[tuple(s) for s in spec["settings"]], d_models=list(spec["d_models"]),
        lrs=list(spec["lrs"]), seeds=list(spec["seeds"]), fixed=dict(spec["fixed"]),
        batch_size_by_seq_len=dict(spec.get("batch_size_by_seq_len", {})),
    )
