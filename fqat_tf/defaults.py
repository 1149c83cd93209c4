"""Every default of fqat_tf, next to its meaning (docs/algorithm.md is the source of each value).

Library code takes these as keyword defaults; the command-line programs name their flags after
the same keys. Nothing else in the package hard-codes a hyperparameter.
"""

# --- Quantizer (docs/algorithm.md §1) -----------------------------------------------------------
QUANTIZER = "lsq"            # "lsq" | "ewgs"
WEIGHT_BITS = 4
ACTIVATION_BITS = 4
MIN_BITS, MAX_BITS = 2, 8
PER_CHANNEL = False          # per-channel weight steps (channel = last kernel axis)
# LSQ gradient-scale element count N for activations: "per_example" (LSQ paper; independent of
# batch size and replica count) or "per_batch" (lsq-net: the whole batch tensor).
ACT_GRAD_COUNT = "per_example"
# Per-channel steps count N over the whole kernel (lsq-net); "per_channel" counts one channel.
WEIGHT_GRAD_COUNT = "per_tensor"
# Steps are clamped at this floor in the forward pass and by a variable constraint after every
# optimizer update, so x / s is always defined.
STEP_FLOOR = 1e-8
EWGS_DELTA = 1e-3            # fixed EWGS delta, in EWGS's normalised units
EWGS_DELTA_MODE = "fixed"    # "fixed" | "hessian" (Hutchinson refresh, clipped at 0)
EWGS_HESSIAN_SAMPLES = 1     # Rademacher probes per Hutchinson estimate
EWGS_HESSIAN_INTERVAL = 500  # steps between delta refreshes in "hessian" mode
# Initial activation step before calibration: clip range [0, 4) for unsigned inputs.
ACT_STEP_INIT_RANGE = 4.0
CALIBRATION = "mse"          # "mse" (Nagel et al. 2021) | "lsq" (2 * mean|v| / sqrt(u))
CALIBRATION_SOURCE = "float"  # "float" (every quantizer bypassed) | "quantized" (in order)
CALIBRATION_CANDIDATES = 100
CALIBRATION_BATCHES = 8
# Integer storage in training (fqat_tf.int8_storage; off in the paper's recipe): the tensors an
# int8 model stores on ranges of their own are fake-quantized at 8 bits on the moving average
# of their batch extremes (set first from the calibration batches).
INT8_STORAGE = False
# How a layer reads an input other layers read too (a residual block's input): "learned" (its
# own b-bit quantizer, the paper) or "stored" (the tensor's 8-bit storage range; no
# requantizing op in the integer model).
SHARED_INPUTS = "learned"
INT8_RANGE_EMA_DECAY = 0.99  # QAT stages are short (hundreds to thousands of steps)

# --- Two-pass step (docs/algorithm.md §2) ---------------------------------------------------------
METHOD = "fqat"
RHO = 0.05
ALPHA = 0.001                # 0.0005 for DomainNet
NORM_EPS = 1e-12
FREEZE_BN = True             # BN runs on inference statistics in every pass
LR = 3e-5                    # weights, from {1e-5, 3e-5, 5e-5}
WEIGHT_DECAY = 1e-4          # 1e-6 for DomainNet
# "coupled": L2 added to the final combined gradient of the weights before Adam's moments, as
# torch.optim.Adam(weight_decay) in the reference code; "decoupled": Keras's AdamW-style decay,
# which at the paper's lr and decay is below float32 resolution (docs/algorithm.md §2).
WEIGHT_DECAY_MODE = "coupled"
SCALE_LR = 1e-5
SCALE_WEIGHT_DECAY = 0.0

# --- Gradient disorder and freezing (docs/algorithm.md §3) ----------------------------------------
FREEZE_INTERVAL = 300        # K, steps per disorder window
FREEZE_THRESHOLD = 0.30      # r
FREEZE_GRID = {
    "pacs_officehome_4_5bit": {"r": (0.28, 0.30, 0.32), "K": (300, 350, 400)},
    "pacs_officehome_3bit": {"r": (0.28, 0.30, 0.32), "K": (100, 150, 200)},
    "domainnet_4_5bit": {"r": (0.20, 0.25), "K": (3000, 4000)},
    "domainnet_8bit": {"r": (0.30, 0.35), "K": (1500, 2000)},
    # Not in the paper (it has no RotatedMNIST QAT): the grid of the offline results table
    # (docs/results.md), K such that its 100-step QAT stage has 4 to 10 disorder windows.
    "rotated_mnist_miniature": {"r": (0.25, 0.35), "K": (10, 25)},
}

# --- DomainBed protocol (docs/algorithm.md §4) ----------------------------------------------------
ERM_STEPS = 5000             # 15000 for DomainNet
QAT_STEPS = 20000            # 50000 for DomainNet, evaluated only after 45000
BATCH_PER_DOMAIN = 32        # 24 for DomainNet
HOLDOUT_FRACTION = 0.2
SEEDS = (0, 23)
IMAGE_SIZE = 224
RESIZED_CROP_SCALE = (0.7, 1.0)
COLOR_JITTER = 0.3           # brightness, contrast, saturation, hue
GRAYSCALE_PROB = 0.1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ROTATED_MNIST_ANGLES = (0, 15, 30, 45, 60, 75)
EVAL_EVERY = 300

# --- Run directories (fqat_tf.trainer, fqat_tf.checkpoints) ---------------------------------
CHECKPOINTS_KEPT = 2         # the previous one is the fallback when the latest is damaged
# A run is reported diverged (warning, results.json "diverged") when the mean training loss of
# an evaluation window exceeds its first window's by this factor, or when an evaluation after
# the first has training-domain validation accuracy at most this factor / number of classes.
DIVERGENCE_LOSS_FACTOR = 10.0
DIVERGENCE_CHANCE_FACTOR = 1.25

# --- Backbones and initialisation (fqat_tf.models) -------------------------------------------
# torch's BatchNorm2d defaults (momentum 0.1 is 0.9 in Keras's convention), so converted torch
# weights give the same outputs; DomainBed's MNIST CNN uses GroupNorm with 8 groups.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
GROUPNORM_GROUPS = 8
GROUPNORM_EPSILON = 1e-5

# --- Data pipeline (fqat_tf.data) -------------------------------------------------------------
EVAL_BATCH_SIZE = 64             # DomainBed's evaluation loaders
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)  # aspect-ratio range of torchvision's RandomResizedCrop
# The one MNIST shuffle before the digits are dealt to the rotated domains; independent of the
# training seed (DomainBed's default --seed 0).
ROTATED_MNIST_SHUFFLE_SEED = 0
DATA_VERIFY = "decode"           # file check before training: "header" (leading bytes) | "decode"
# Files that passed the check are remembered in a manifest (fqat_tf.data.manifest), by default
# in the data root when it is writable, else in this per-user folder; the environment variable
# names a folder that overrides both.
MANIFEST_NAME = ".fqat_tf_manifest.json"
DATA_CACHE_DIR = "~/.cache/fqat_tf"
DATA_CACHE_ENV = "FQAT_TF_CACHE"
# TFDS sources are read in file order: every epoch permutes each window of this many
# consecutive records (encoded images held at once per domain).
TFDS_SHUFFLE_WINDOW = 2000

# --- Loss landscape (fqat_tf.landscape; Li et al. 2018, paper Fig. 1 and 7) -----------------
LANDSCAPE_GRID = 21          # points per direction; odd, so the trained model is the centre
LANDSCAPE_SPAN = 1.0         # coordinates run over [-span, span] along each direction
LANDSCAPE_BATCHES = 4        # training-domain validation batches the loss is averaged over
LANDSCAPE_SEED = 0           # seed of the two random directions

# --- The paper's search and analyses (fqat_tf.sweep, fqat_tf.scale_sensitivity) --------------
# Phase 1 of the paper's two-phase search (§5.1): the weight learning rate, selected on the
# flagfile's own setting by training-domain validation before r and K are gridded.
LR_GRID = (1e-5, 3e-5, 5e-5)
# Paper Table 3 multiplies one layer's scale factors by 80%, 90%, 110% and 120%.
SCALE_FACTORS = (0.8, 0.9, 1.1, 1.2)
# How many `--check_only` probes of existing run directories a sweep runs at a time.
SWEEP_CHECK_PARALLEL = 4

# --- Integer TFLite export (export/) ----------------------------------------------------------
# Activation ranges of the tensors the Keras model keeps float come from this many batches of
# the training stream (one block per training domain, evaluation transform, no augmentation).
EXPORT_REPRESENTATIVE_BATCHES = 4
EXPORT_IO = "int8"               # type of the TFLite model's input and output: "int8" | "float"
# Storage of the learned kernels whose integers fit in 4 bits: "int8" | "int4" (two a byte;
# LiteRT's XNNPACK delegate runs only FULLY_CONNECTED with them, export/int4.py).
EXPORT_WEIGHT_STORAGE = "int8"
EXPORT_MIN_AGREEMENT = 0.99      # export.verify fails below this top-1 agreement with Keras
EXPORT_VERIFY_BATCH = 64         # images per interpreter call in export.verify
LATENCY_RUNS = 100               # timed single-image runs per setting (the median is reported)
LATENCY_WARMUP = 10
LATENCY_THREADS = (1, 2)
