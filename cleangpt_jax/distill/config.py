"""Default distillation config: GPT-2 into a 6-block, 384-wide Token-Factored student.

Run: python -m cleangpt_jax.distill --workdir=runs/distill_factored
(the teacher `gpt2` comes from the Hugging Face hub; configs/distill_shakespeare_offline.py
needs no network). Files in configs/distill_*.py start from this config.

The `model` section is the student's (its vocabulary and tokenizer come from the teacher); the
`data` section is the training one; of `train`, batch_size, seed, fsdp, the multi-host keys and
the AdamW moments adam_b1, adam_b2, adam_eps are used (every stage's optimizer). Stages
(docs/distillation.md, "The stages"): block_1..block_L (hidden-state distillation through the
stitching layers), then `head`, then the optional end-to-end `final`.
"""

import ml_collections

from cleangpt_jax import config as base_config


def per_block(value):
    """A field that holds one value or a list with one value per block
    (`--config.distill.learning_rate='[1e-3,5e-4]'` works on the command line)."""
    return ml_collections.FieldReference(value, field_type=object)


def optional(field_type):
    return ml_collections.FieldReference(None, field_type=field_type)


def get_config() -> ml_collections.ConfigDict:
    cfg = base_config.get_config()
    cfg.model.model_type = "factored"
    cfg.model.n_layer = 6
    cfg.model.n_head = 6
    cfg.model.n_embd = 384
    cfg.model.block_size = 128
    cfg.model.dropout = 0.0
    cfg.tokenizer.type = "gpt2"
    cfg.train.batch_size = 16

    d = cfg.distill = ml_collections.ConfigDict()
    d.teacher = "gpt2"                  # hub name or local directory (config.json + weights)
    d.teacher_dtype = optional(str)     # None: model.dtype (bfloat16 halves the teacher's memory)
    d.layer_map = per_block("uniform")  # or a list: teacher block (1-based) per student block
    d.block_stages = True               # False: no hidden-state stages (logit-only distillation)
    d.stitching = True                  # stitch_k: Dense d_s -> d_t before the hidden loss
    d.stitching_bias = True  # the stitching layers have a bias
    d.hidden_loss = "mse"               # any registered loss: mse | cosine | kl_div | ...
    d.hidden_temperature = 1.0  # temperature of the hidden-state loss (kl_div)
    d.freeze_previous_blocks = True  # earlier student blocks stay fixed in a block stage
    d.steps_per_block = per_block(200)  # int or one per block
    d.epochs_per_block = per_block(None)  # float or one per block; overrides steps_per_block
    d.learning_rate = per_block(1e-3)   # float or one per block
    d.weight_decay = per_block(0.01)    # float or one per block
    d.grad_clip = per_block(1.0)        # float or one per block; 0 = off
    d.warmup_steps = 20                 # per stage, at most a tenth of the stage
    d.checkpoint_every = 100            # mid-stage saves (and on SIGTERM / Ctrl-C)
    d.log_every = 10  # steps per metrics record and log line
    d.profile_steps = optional(str)     # 'START,END' (global steps): trace into WORKDIR/profile
    d.eval_steps = 20                   # validation batches for the final student's perplexity
    d.eval_every = 0                    # the student's val_loss every N global steps; 0 = off
    # DistilGPT2's initialisation: student block k <- teacher block layer_map(k), embeddings,
    # ln_f and head <- the teacher's (needs the teacher's architecture and width)
    d.init_from_teacher = False

    d.head = ml_collections.ConfigDict()
    d.head.enabled = True  # run the head (logit distillation) stage
    d.head.steps = 200  # steps of the head stage
    d.head.epochs = optional(float)     # overrides steps
    d.head.learning_rate = 1e-3  # peak learning rate of the head stage
    d.head.weight_decay = 0.01  # AdamW weight decay of the head stage
    d.head.grad_clip = 1.0  # global-norm clipping of the head stage; 0 = off
    d.head.init_from_teacher = True     # copy (equal widths) or W_t S through stitch_L
    d.head.untie = True                 # train an own lm_head; the embeddings stay frozen
    d.head.fold_ln_scale = True  # at other widths: W_t diag(ln_f scale) S, not W_t S
    d.head.logit_loss = "kl_div"        # kl_div | mse | ce | any registered loss
    d.head.temperature = 2.0  # softmax temperature of the logit loss
    d.head.logit_weight = 1.0  # weight of the logit loss against the teacher
    d.head.lm_weight = 0.0              # weight of the LM cross-entropy on the data

    d.final = ml_collections.ConfigDict()  # optional end-to-end stage (DistilGPT2 style)
    d.final.enabled = False  # run the end-to-end stage after the head
    d.final.steps = 200  # steps of the final stage
    d.final.epochs = optional(float)  # overrides steps
    d.final.learning_rate = 3e-4  # peak learning rate of the final stage
    d.final.weight_decay = 0.01  # AdamW weight decay of the final stage
    d.final.grad_clip = 1.0  # global-norm clipping of the final stage; 0 = off
    d.final.logit_loss = "kl_div"  # kl_div | mse | ce | any registered loss
    d.final.temperature = 2.0  # softmax temperature of the logit loss
    d.final.logit_weight = 1.0  # weight of the logit loss against the teacher
    d.final.lm_weight = 1.0  # weight of the LM cross-entropy on the data
    return cfg
