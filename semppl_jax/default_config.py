"""The base configuration every preset in ``experiments/`` starts from.

Values follow ``docs/method.md``; where the paper could not
be checked, the comment says "best reading" and where the value comes from.
Durations are in epochs (converted with the dataset size) unless
``training.num_steps`` is set.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.job = "pretrain"  # what the config is for: 'pretrain' (train, export, pseudo_label) or 'eval'
    c.seed = 0

    c.dataset = ml_collections.ConfigDict(dict(
        # 'imagenet2012', 'mnist5k' (embedded real digits), 'synthetic', any TFDS
        # image-classification name, or 'folder:/path/to/root' (root/<split>/<class>/*;
        # images under root/<split>/unlabelled/ carry no label).
        name="synthetic",
        # A CSV of 'file_name,class' labelling a folder's images by base name (no class
        # directories needed; images it does not list carry no label).
        labels_file=ml_collections.FieldReference(None, field_type=str),
        # More training images without labels, after the split's: 'folder:/path' (every
        # image under it, any nesting) or a TFDS name (its unlabelled_split; labels ignored).
        unlabelled=ml_collections.FieldReference(None, field_type=str),
        unlabelled_split="train",
        data_dir=ml_collections.FieldReference(None, field_type=str),
        train_split="train",
        eval_split="test",
        # '1pct' / '10pct' (SimCLR's ImageNet lists), a path to a list of file
        # names, or a fraction such as '0.1' (class-stratified, seeded) of the images that
        # have a class: '1.0' labels every image that has one (own data with unlabelled/).
        label_subset="0.1",
        label_seed=0,
        subset_cache_dir=ml_collections.FieldReference(None, field_type=str),
        fetch_subsets=False,  # allow downloading SimCLR's lists into subset_cache_dir
        # None: every image once an epoch (the paper's default). An int: that many
        # labelled images in every global batch, class-stratified (PAWS-style).
        labelled_per_batch=ml_collections.FieldReference(None, field_type=int),
        # Labelled images a class held back from pretraining as a calibration fold: voted
        # like the unlabelled images and never in the loss, they measure the pseudo-labels'
        # accuracy without the bias of labels that shaped the embedding (the logged
        # estimate and its interval). Evaluation and export still use their labels. 0: off.
        calibration_per_class=0,
        synthetic_size=512,  # images in the 'synthetic' dataset
        synthetic_image_size=40,
        shuffle_buffer=10_000,
        # Decode every image once at start-up and leave out (with a warning naming each)
        # those that fail. None: on for 'folder:' datasets, off for prepared TFDS ones.
        validate_images=ml_collections.FieldReference(None, field_type=bool),
    ))

    c.views = ml_collections.ConfigDict(dict(
        num_large=4, large_size=224, large_scale=(0.08, 1.0),
        num_small=2, small_size=96,
        small_scale=(0.05, 0.14),  # best reading (method doc): small crops' area range
        aspect_ratio=(3 / 4, 4 / 3),
        eval_resize=256, eval_size=224,  # centre crop 224 of 256
        # TPU: ship training images as [V, H, W, C, batch] (the double-transpose
        # trick: cheaper host-to-device transfers); transposed back on device.
        transpose_images=False,
    ))

    # BYOL's recipes; blur/solarise probabilities alternate over views.
    c.augment = ml_collections.ConfigDict(dict(
        flip=True, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, color_jitter_prob=0.8,
        grayscale_prob=0.2, blur_prob=(1.0, 0.1), solarize_prob=(0.0, 0.2),
        # Not in BYOL: a random turn of up to this many degrees either way (uniform), on
        # device before the colour ops, black outside the source. 0 builds nothing.
        rotation_degrees=0.0,
        # How the blur runs: 'conv' (a per-image separable convolution) or 'banded_matmul'
        # (two banded matrix products; the same blur). `device_check.py --profile` times both.
        blur_impl="conv",
    ))

    c.model = ml_collections.ConfigDict(dict(
        depth="resnet50", width_multiplier=1.0, resnet_v2=False,  # 2.0 is SimCLR's 2x
        sk_ratio=0.0,  # 0.0625 gives SimCLRv2's selective kernels
        bn_decay=0.9,  # BYOL's BN EMA decay
        projector_hidden_size=4096, predictor_hidden_size=4096, projection_size=256,
        # Rematerialisation per ResNet block (jax.checkpoint): 'none', 'block' (keep block
        # inputs, recompute the rest: least memory) or 'block_save_convs' (keep conv outputs).
        remat="none",
        # ResNet's 3x3/2 max pool after the stem; off keeps twice the resolution in every
        # group, for small images (a 28-pixel digit reaches group 0 at 7x7 with it).
        stem_max_pool=True,
        stem_stride=2,  # the stem's first conv; 1 keeps a small image's full resolution (SimCLR's CIFAR net)
    ))

    c.semppl = ml_collections.ConfigDict(dict(
        # Best readings of the paper (docs/method.md): c, alpha, temperature, k and M; lambda
        # is the value measured to train without collapse (docs/research_log.md).
        c=0.3, alpha=0.2, lam=0.2, temperature=0.2,
        knn_k=1, num_positives=3,
        queue_size=20_480,  # best reading: entries (one per labelled image and large view)
        knn_query="target",  # 'target' projections (method default) or 'online' predictions
        knn_approx=False,  # lax.approx_max_k for the k-NN (TPU's fast top-k; exact elsewhere)
        # Not in the paper (an option to test): no semantic positives until the queue is full,
        # so the first pseudo-labels, voted by a few early entries, draw no positives.
        positives_after_queue_full=False,
        # The vote-share gate (semppl_jax/vote_gate.py): an unlabelled image draws semantic
        # positives only if its k-NN vote share (the label's share of the L x k neighbours)
        # reaches the threshold: the lowest share at which the queue's labelled images,
        # voted with their own entries left out, are min_vote_precision right (0: not
        # measured), and at least min_vote_share (a fixed floor). Both 0: every vote (paper).
        # Measured: docs/unsure_pseudo_labels.md (wrong positives pull classes together).
        min_vote_share=0.0, min_vote_precision=0.9,
        # How sure the gate must be of that precision: the one-sided confidence of a Wilson
        # lower bound over the distinct labelled images voted (0: the point estimate).
        gate_confidence=0.8,
        gate_samples=512,  # labelled queue images voted a step for the threshold (all replicas)
        num_negatives=ml_collections.FieldReference(None, field_type=int),  # None: all B-1
        same_crop_pairs=False,
    ))

    c.optim = ml_collections.ConfigDict(dict(
        base_lr=0.2,  # x batch/256 (method doc, step 7)
        warmup_epochs=10.0, weight_decay=1.5e-6, momentum=0.9, trust_coefficient=1e-3,
        ema_base=0.996,  # BYOL's tau_base
    ))

    c.training = ml_collections.ConfigDict(dict(
        batch_size=4096, num_epochs=300.0,
        # Set: the global batch is this many images a device (batch_size is then ignored),
        # at most max_batch_fraction of the training images (experiments/folder.py).
        batch_per_device=ml_collections.FieldReference(None, field_type=int),
        max_batch_fraction=ml_collections.FieldReference(None, field_type=float),
        num_steps=ml_collections.FieldReference(None, field_type=int),  # overrides num_epochs
        log_every_steps=100,
        checkpoint_every_steps=1000, checkpoint_every_minutes=30.0, keep_checkpoints=3,
        eval_every_steps=ml_collections.FieldReference(None, field_type=int),  # online k-NN eval
        eval_max_examples=ml_collections.FieldReference(None, field_type=int),
        compute_dtype="float32",  # 'bfloat16' for mixed precision
        # Collapse guard, checked at log steps after warm-up: the spread of the normalised
        # online projections below collapse_std_fraction / sqrt(D), or L_augm / log(candidates)
        # above collapse_loss_ratio (InfoNCE at chance). Warns once; stop_on_collapse stops
        # the run with a checkpoint.
        collapse_std_fraction=0.25, collapse_loss_ratio=0.995, stop_on_collapse=False,
        # A jax.profiler trace of profile_num_steps steps from profile_first_step into
        # WORKDIR/profile, for TensorBoard's profile plugin. None: no trace.
        profile_first_step=ml_collections.FieldReference(None, field_type=int), profile_num_steps=5,
    ))

    # Evaluation (``experiments/eval.py`` sets the protocol's defaults).
    c.eval = ml_collections.ConfigDict(dict(
        protocol="finetune",  # 'finetune' | 'linear' | 'knn'
        # Our workdir (its latest checkpoint) or a released-format pretrain.pkl;
        # None: the --workdir's own checkpoint; 'scratch': random init (supervised baseline).
        checkpoint=ml_collections.FieldReference(None, field_type=str),
        train_on="labelled",  # 'labelled' subset (semi-supervised) or 'all' (linear protocol)
        batch_size=256, num_epochs=30.0, base_lr=0.01, weight_decay=0.0, momentum=0.9,
        crop_scale=(0.08, 1.0), flip=True,
        knn_k=20, knn_temperature=0.07,
        max_test_examples=ml_collections.FieldReference(None, field_type=int),
    ))
    return c
