"""The training config schema with the paper's values: `default_config()`; configs/*.py start from it, then lock it.

Imports only ml_collections, so that loading a config never imports JAX (tests/test_configs.py checks it). Values
that have a library-side default elsewhere (the LoRA targets of lora.LoraConfig, the logical-axis rules of
sharding.DEFAULT_RULES, the synthetic styles of data.synthetic) are the experiment's choice here, stated literally as
big_vision configs do; tests/test_configs.py checks that they still equal those defaults.
"""
import ml_collections

__all__ = ["default_config", "data_config"]


def default_config() -> ml_collections.ConfigDict:
    """The whole training schema (docs/METHOD.md, "The adapter" and "Training objective")."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Models: converted checkpoint dirs (python -m convert.*); "" builds random weights of the named variant.
    c.model = ml_collections.ConfigDict(dict(
        variant="vace-14B", dit="", vae_variant="wan2.1", vae="", umt5_variant="umt5-xxl", umt5="",
        tokenizer="", param_dtype="bfloat16", dtype="bfloat16", attention="cudnn", remat_policy="full",
        ffn_chunk=0, scan_layers=True))
    # how self-attention meets video tokens split over a "context" mesh axis: "auto" | "ulysses" | "ring" (wan.Options)
    c.model.context_parallel = "auto"
    # q, k, v of the VACE blocks' self-attention (re.fullmatch against dotted module paths)
    c.lora = ml_collections.ConfigDict(dict(rank=128, alpha=128.0, targets=r"vace_blocks\.\d+\.self_attn\.(q|k|v)"))
    c.schedule = ml_collections.ConfigDict(dict(shift=5.0, num_train_timesteps=1000))
    c.optim = ml_collections.ConfigDict(dict(lr=5.6e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
                                             grad_clip=1.0, accumulate=1))
    c.data = data_config()
    c.total_steps = -1          # -1: all of data.num_epochs
    c.log_every = 10
    c.peak_flops = 0.0          # dense bf16 FLOP/s of one device, for the logged MFU; 0: flops.PEAK_BF16's table
    c.checkpoint_every = 10
    c.keep = 3
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, context=1))
    # logical axis -> mesh axis (or a tuple of them, or None = replicated); strict: an array the rules split must
    # divide, or the run is refused (sharding.py)
    c.rules = ml_collections.ConfigDict(dict(
        batch=("data", "fsdp"), layers=None, embed=("fsdp", "context"), heads="tensor", mlp="tensor", mod=None,
        vocab=None, length="context", allow_replicate=False))
    c.distributed = ml_collections.ConfigDict(dict(coordinator="", num_processes=1, process_id=0, auto=False))
    c.text = ml_collections.ConfigDict(dict(cache_dir="", text_len=512))
    return c


def data_config() -> ml_collections.ConfigDict:
    """`config.data`, what data.make_iterator reads: the official settings (81 x 480 x 832 clips, docs/METHOD.md
    "Training data") over a synthetic source."""
    c = ml_collections.ConfigDict()
    # What to read.
    c.source = "synthetic"         # "synthetic", "folder_v1", "folder_v2", "tfds", or folder layouts joined by "+"
    c.root = ""                    # folder_*: the layout root (os.pathsep-separated, one per source); tfds: data_dir
    c.tfds_layout = "v2"           # tfds: the builder config(s) built into root: "v1", "v2" or "v1+v2"
    c.styles = ()                  # style folders (v1: "anime", v2: "Clay_Toy") or tfds style names; () = all
    c.strict_names = True          # folders: paired files must share stems (False = sorted index only, official)
    c.synthetic_examples = 64      # synthetic: number of pairs, drawn at height x width
    c.synthetic_styles = ("toon", "sketch", "neon", "pastel")
    c.synthetic_seed = 0
    # Clip geometry.
    c.frames = 81
    c.height = 480
    c.width = 832
    c.allow_upscale = False        # images smaller than height x width: error/skip (False) or upsample (official)
    # Motion augmentation; one draw per example, shared by source and target.
    c.move_prob = 0.8
    c.zoom_range = (1.2, 2.0)
    c.shift_range = (100, 200)     # integer pixels, inclusive (official values assume 480 x 832)
    c.angle_range = (-20.0, 20.0)  # degrees
    # Batching and order.
    c.batch_size = 32              # global; each host gets batch_size // process_count
    c.shuffle = True
    c.num_epochs = 57              # None = repeat forever
    # Throughput.
    c.num_workers = 0              # Grain worker processes (0 = render in this process)
    c.worker_buffer = 1            # batches (on_error="skip": examples) buffered per worker; ~194 MB per example
                                   # at 81x480x832
    c.read_threads = 1             # threads per process reading + rendering examples
    c.prefetch = 2                 # batches assembled ahead in a background thread (0 = off)
    # Robustness and multi-host.
    c.on_error = "raise"           # "raise": bad input is an error naming the file; "skip": warn, count, drop
    c.process_index = -1           # -1: jax.process_index(); set both (e.g. in tests) to simulate hosts
    c.process_count = -1           # -1: jax.process_count()
    return c
