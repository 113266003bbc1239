"""LoRA adapters: PyTorch files <-> pickstyle_jax LoRA checkpoints.

    python -m convert.lora --src pickstyle_lora.pth | adapter.safetensors --dst DST [--alpha A] [--config NAME]
    python -m convert.lora --export SRC_DIR --dst FILE.pth | FILE.safetensors

Import formats:
- PickStyle `.pth`: `module.vace_blocks.{j}.self_attn.{q,k,v}.lora_A.<adapter>.weight` [r, in] and `lora_B...` [out, r].
  The DDP `module.` prefix is removed only where present (the official loader's unconditional strip is quirk #3).
  The file carries no alpha: the default is alpha = rank, PickStyle's setting.
- PEFT / diffusers safetensors: `transformer.vace_blocks.{j}.attn1.to_q.lora_A.weight` (diffusers module names,
  optionally without `transformer.`), or official module names; alpha from `--alpha`, else the safetensors
  metadata (`lora_alpha` or a PEFT `adapter_config` json), else an `adapter_config.json` beside the file, else rank.

Export writes the PickStyle layout to `.pth` (with `module.`, so the official loader reads it too) and the diffusers
layout to `.safetensors` (with `lora_alpha`/`r` metadata). Strict: every key must be a LoRA A/B weight of a known
module, A and B must pair up with one rank, and with `--config` every module must exist in that model with matching
shapes; all offending keys are named in one error.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import jax
import numpy as np

from convert import common
from pickstyle_jax import checkpoints
from pickstyle_jax import lora as lora_lib
from pickstyle_jax import lora_export
from pickstyle_jax.lora_export import diffusers_to_official_module, official_to_diffusers_module

_KEY_RE = re.compile(r"^(?P<module>.+?)\.lora_(?P<ab>A|B)(?:\.(?P<adapter>[A-Za-z0-9_\-]+))?\.weight$")
_PREFIXES = ("module.", "base_model.model.", "transformer.", "diffusion_model.", "model.diffusion_model.")


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _to_official(module: str) -> str:
    try:
        return diffusers_to_official_module(module)
    except KeyError:
        official_to_diffusers_module(module)  # raises KeyError for names in neither table
        return module


def _read_alpha(src: Path, metadata: dict | None):
    if metadata and "lora_alpha" in metadata:
        return float(metadata["lora_alpha"])
    for key in ("adapter_config", "peft_config"):
        if metadata and key in metadata:
            cfg = json.loads(metadata[key])
            cfg = next(iter(cfg.values())) if "lora_alpha" not in cfg and cfg else cfg
            if "lora_alpha" in cfg:
                return float(cfg["lora_alpha"])
    side = src.parent / "adapter_config.json"
    if side.is_file():
        return float(json.loads(side.read_text())["lora_alpha"])
    return None


def import_lora(src, *, alpha: float | None = None, config: str | None = None) -> lora_lib.Lora:
    """Reads a PickStyle `.pth` or PEFT/diffusers safetensors file into a `lora.Lora`."""
    src = Path(src)
    sd = common.open_state_dict(src)
    metadata = None
    if src.suffix == ".safetensors":
        from safetensors import safe_open

        metadata = safe_open(str(src), framework="pt").metadata()
    problems, pairs, adapters = [], {}, set()
    for key in sd:
        if key.endswith("lora_scaling") or ".lora_scaling." in key:
            continue  # PickStyle's optional scalar; never written by training, alpha/rank is used instead
        m = _KEY_RE.match(_strip(key))
        if not m:
            problems.append(f"not a LoRA A/B weight: {key}")
            continue
        try:
            module = _to_official(m.group("module"))
        except KeyError:
            problems.append(f"unknown module {m.group('module')!r} in {key}")
            continue
        adapters.add(m.group("adapter"))
        pairs.setdefault(module, {})[m.group("ab")] = key
    if len(adapters) > 1:
        problems.append(f"several adapters in one file: {sorted(a or '(unnamed)' for a in adapters)}; keep one")
    ranks = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            problems.append(f"{module}: lora_{'B' if 'A' in ab else 'A'} is missing")
            continue
        r, r2 = sd.shape(ab["A"])[0], sd.shape(ab["B"])[1]
        if r != r2:
            problems.append(f"{module}: A is {sd.shape(ab['A'])} and B is {sd.shape(ab['B'])}: ranks differ")
        ranks[module] = r
    if len(set(ranks.values())) > 1:
        problems.append(f"modules have different ranks {sorted(set(ranks.values()))}")
    if not pairs and not problems:
        problems.append(f"{src} holds no LoRA weights")
    if problems:
        raise common.ConversionError(f"{src}:\n  - " + "\n  - ".join(problems))

    rank = next(iter(ranks.values()))
    if alpha is None:
        alpha = _read_alpha(src, metadata)
    if alpha is None:
        alpha = float(rank)
    params: dict = {}
    for module, ab in pairs.items():
        node = params
        for part in module.split("."):
            node = node.setdefault(part, {})
        node["A"] = np.ascontiguousarray(sd[ab["A"]].astype(np.float32).T)  # [in, r]
        node["B"] = np.ascontiguousarray(sd[ab["B"]].astype(np.float32).T)  # [r, out]
    modules = sorted(pairs)
    default = lora_lib.LoraConfig().targets
    targets = default if all(re.fullmatch(default, m) for m in modules) else \
        "|".join(re.escape(m) for m in modules)
    adapters_ = lora_lib.Lora(params=params, config=lora_lib.LoraConfig(rank=rank, alpha=alpha, targets=targets))
    if config:
        check_against(adapters_, config)
    return adapters_


def check_against(adapters: lora_lib.Lora, config: str):
    """Every adapted module exists in the named model variant and its A/B shapes fit the kernel."""
    from pickstyle_jax.models import wan

    cfg = wan.WanConfig.named(config)
    shapes = common.flatten_shapes(jax.eval_shape(lambda: wan.init(cfg, jax.random.key(0))))
    problems = []
    for path, a_shape in common.flatten_shapes(adapters.params).items():
        module, which = path.rsplit(".", 1)
        kernel = shapes.get(f"{module}.kernel")
        if kernel is None:
            problems.append(f"{module}: no such layer in {config}")
        elif which == "A" and a_shape[0] != kernel[0] or which == "B" and a_shape[1] != kernel[1]:
            problems.append(f"{module}.{which} {a_shape} does not fit the kernel {kernel} of {config}")
    if problems:
        raise common.ConversionError("LoRA does not fit the model:\n  - " + "\n  - ".join(sorted(set(problems))))


def export_lora(adapters: lora_lib.Lora, dst) -> Path:
    """Writes PickStyle `.pth` (module.-prefixed, with torch.save) or diffusers/PEFT `.safetensors` with alpha/rank
    metadata (the package's writer, the same file training writes as DIR/lora.safetensors)."""
    dst = Path(dst)
    if dst.suffix not in (".pth", ".safetensors"):
        raise ValueError(f"--dst must end in .pth or .safetensors, got {dst.name}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.suffix == ".safetensors":
        return lora_export.write_peft_safetensors(dst, adapters)
    import torch

    tensors = {k: torch.from_numpy(w) for k, w in lora_export.pickstyle_state_dict(adapters).items()}
    tmp = dst.with_name(dst.name + ".tmp")
    torch.save(tensors, tmp)
    tmp.replace(dst)
    return dst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", help="PickStyle .pth or PEFT/diffusers .safetensors")
    ap.add_argument("--export", help="a pickstyle_jax LoRA checkpoint directory to write back to PyTorch")
    ap.add_argument("--dst", required=True)
    ap.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: from the file, else rank)")
    ap.add_argument("--config", default=None, help="check the adapter against this DiT variant, e.g. vace-14B")
    args = ap.parse_args(argv)
    if bool(args.src) == bool(args.export):
        ap.error("give exactly one of --src (import) or --export (back to PyTorch)")
    try:
        if args.export:
            out = export_lora(checkpoints.load_lora(args.export), args.dst)
            print(f"exported {args.export} -> {out}")
        else:
            adapters = import_lora(args.src, alpha=args.alpha, config=args.config)
            checkpoints.save_lora(args.dst, adapters, extra={"source": str(args.src)})
            n = sum(int(np.prod(s)) for s in common.flatten_shapes(adapters.params).values())
            print(f"converted {args.src} -> {args.dst}: {n / 1e6:.2f} M LoRA parameters, {adapters.config}")
    except (ValueError, OSError, KeyError) as e:  # ConversionError is a ValueError; OSError: unreadable, disk full
        common.fail(e)


if __name__ == "__main__":
    main()
