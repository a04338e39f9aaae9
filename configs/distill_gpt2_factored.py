"""The original's README example: GPT-2 distilled block by block into a Token-Factored student.

    python -m cleangpt_jax.distill --config=configs/distill_gpt2_factored.py --workdir=runs/distill_factored

As `examples/run_distillation_example.py --teacher_model_name_or_path gpt2
--student_model_type Factored --student_n_embd 384 --student_n_head 6 --dataset_name
roneneldan/TinyStories --dataset_text_column story --epochs_per_block 3 --batch_size 32`:
the student keeps the teacher's 12 blocks (the original copied n_layer from the teacher) at
half its width, so every stitching layer maps 384 -> 768; 3 epochs per block over the first
100k stories (the original's --max_samples default), block size 128, then 3 epochs of head
distillation (KL at T = 2) with the head initialised as W_gpt2 S_12. The text column is
`text`, the only column roneneldan/TinyStories has: the original's example passed `story`,
and an explicit column that does not exist is an error here. Learning rate 5e-5,
weight decay 0.01, clipping 1.0 per block: the original's defaults. Needs the Hugging Face
hub (teacher and data); a full run is long (about 14k steps per block on one accelerator), so
try --config.distill.epochs_per_block=0.1 first. Rerunning the command resumes.

Run time, roughly (scripts/estimate_run_times.py: 4.13e+17 FLOPs at the 50 GFLOP/s the default
config sustains on a 2-core CPU, and at 80 TFLOP/s, ~40% MFU of one v5e chip): ~96 days on a
2-core CPU, ~86 min on one accelerator chip.
"""

from cleangpt_jax.config import TINYSTORIES
from cleangpt_jax.distill import config as distill_config


def get_config():
    cfg = distill_config.get_config()
    cfg.model.update(model_type="factored", n_layer=12, n_head=6, n_embd=384, block_size=128,
                     dropout=0.1, bias=False)
    cfg.data.update(**TINYSTORIES)
    cfg.train.batch_size = 32
    d = cfg.distill
    d.teacher = "gpt2"
    d.hidden_loss = "mse"
    d.epochs_per_block = 3.0
    d.learning_rate = 5e-5
    d.weight_decay = 0.01
    d.grad_clip = 1.0
    d.warmup_steps = 100
    d.checkpoint_every = 1000
    d.log_every = 50
    d.head.update(enabled=True, epochs=3.0, learning_rate=5e-5, weight_decay=0.01,
                  grad_clip=1.0, init_from_teacher=True, logit_loss="kl_div", temperature=2.0,
                  logit_weight=1.0, lm_weight=0.0)
    return cfg
