"""Stage 1, ``align``: multimodal alignment by parameter-efficient fine-tuning.

Each aligned role gets a fresh LoRA adapter (:func:`mmdc.training.apply_lora`: the language
model's projections and the projector, the vision tower frozen), trained on the seed
split's labelled instances in the configured prompt format; the result is a PEFT adapter
folder, ``RUN_DIR/align/<role>/adapter``, that the calibration loop continues.
"""

from __future__ import annotations

from pathlib import Path

from mmdc.training import apply_lora, sft_rows, train_sft


def run_align(cfg, role: str, out_dir: str | Path) -> dict:
    """Align one role (teacher or student) on the seed split; returns a summary."""
    import math

    from mmdc.data.load import load_split_collective
    from mmdc.models.load import load_configured

    mcfg = getattr(cfg, role)
    split = load_split_collective(cfg.data, cfg.data.seed_split)
    split.load_images()
    labelled = [i for i in split.instances if i.answer is not None]
    loaded = load_configured(mcfg, adapter=None)
    rows = sft_rows(labelled, [split.image(i) for i in labelled], cfg.align.prompt)
    from transformers import set_seed

    set_seed(cfg.seed)  # the LoRA init must not depend on what ran before in the process
    model = apply_lora(loaded.model, cfg.align.lora)
    out_dir = Path(out_dir)
    history = train_sft(model, loaded.processor, rows, out_dir / "adapter", cfg.align.train,
                        logging_dir=Path(cfg.run_dir) / "tensorboard" / f"align-{role}",
                        seed=cfg.seed, label=f"align/{role}",
                        max_length_key="align.train.max_length")
    losses = [h["loss"] for h in history if "loss" in h]
    if not losses or not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"align {role}: training produced non-finite losses {losses}")
    return {"role": role, "instances": len(rows), "steps": cfg.align.train.max_steps,
            "losses": losses, "adapter": str(out_dir / "adapter")}
