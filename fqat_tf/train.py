"""The training program: ERM (full precision) then QAT with any method, DomainBed protocol.

    python -m fqat_tf.train --flagfile=experiments/pacs_w3.cfg
    python -m fqat_tf.train --flagfile=experiments/quickstart.cfg
    python -m fqat_tf.train --flagfile=experiments/pacs_w3.cfg --smoke --data_dir=/tmp/tiny

A quantized method runs two stages: the ERM stage (reused from `--erm_cache_dir` when a run with
the same ERM settings finished before, found by a hash of those settings) and the QAT stage in
`--output_dir`, started from the ERM model. A float method (erm, sagm) is one stage. Rerunning
the same command resumes an interrupted run from its last checkpoint and leaves a finished run
alone. The run directory layout is `fqat_tf.rundir`'s.

Flags are read here and nowhere else; the stage itself (`fqat_tf.trainer`) takes a plain dict.
Bad input ends in one message naming the flag, file or value (exit 1; 2 for a usage error),
without a traceback unless `--verbosity=debug` (`fqat_tf.cli`).

`--check_only` resolves the settings and compares them with what `--output_dir` holds, and
starts nothing: exit 0 when the directory is free or holds this run (finished or not), exit 3
when it holds a run with other settings (the sweep uses this to report conflicts).
"""
import json
import os
import sys

from absl import app, flags, logging

from fqat_tf import cli, defaults

FLAGS = flags.FLAGS
PROG = "fqat_tf.train"
EXIT_CONFLICT = 3

flags.DEFINE_string("dataset", "rotated_mnist_5k", "Dataset name (fqat_tf.data.DATASETS).")
flags.DEFINE_string("data_dir", None, "Data root (DomainBed layout, image_folder tree or TFDS).")
flags.DEFINE_list("test_domains", ["0"], "Held-out test domain(s), by name or index.")
flags.DEFINE_string("backbone", None, "resnet50 | resnet18 | mnist_cnn (default per dataset).")
flags.DEFINE_integer("width", None, "Backbone width (first-stage channels); None = published.")
flags.DEFINE_integer("image_size", None, "Square input side for photo datasets (default 224).")
flags.DEFINE_string("init", "none", "none | imagenet | mocov2:PATH (weights of the ERM stage).")
flags.DEFINE_string("method", defaults.METHOD,
                    "erm | sagm | lsq | lsq_sagm | fqat | alter | freeze_both | no_unfreeze | "
                    "reverse; ewgs and ewgs_sagm are lsq and lsq_sagm with --quantizer=ewgs.")
flags.DEFINE_enum("quantizer", None, ["lsq", "ewgs"], "Quantizer (default lsq).")
flags.DEFINE_integer("weight_bits", defaults.WEIGHT_BITS, "Weight bit width, 2..8.")
flags.DEFINE_integer("activation_bits", defaults.ACTIVATION_BITS, "Activation bit width, 2..8.")
flags.DEFINE_bool("per_channel", defaults.PER_CHANNEL, "Per-channel weight steps.")
flags.DEFINE_bool("int8_storage", defaults.INT8_STORAGE,
                  "Train with the 8-bit storage of the integer TFLite export simulated "
                  "(fqat_tf.storage): the exported model then matches the trained one.")
flags.DEFINE_enum("shared_inputs", defaults.SHARED_INPUTS, ["learned", "stored"],
                  "How a conv reads an input other layers read too (a residual block's input): "
                  "'learned', its own b-bit quantizer (the paper); 'stored', the 8-bit range "
                  "the integer model stores it on (with --int8_storage: no requantizing op in "
                  "the TFLite model; such convs see 8-bit inputs).")
flags.DEFINE_float("ewgs_delta", defaults.EWGS_DELTA, "EWGS delta (fixed mode / initial).")
flags.DEFINE_enum("ewgs_delta_mode", defaults.EWGS_DELTA_MODE, ["fixed", "hessian"],
                  "EWGS delta: fixed, or refreshed from a Hutchinson Hessian-trace estimate.")
flags.DEFINE_integer("ewgs_hessian_interval", defaults.EWGS_HESSIAN_INTERVAL,
                     "Steps between EWGS delta refreshes in hessian mode.")
flags.DEFINE_enum("act_grad_count", defaults.ACT_GRAD_COUNT, ["per_example", "per_batch"],
                  "LSQ gradient-scale element count for activation steps.")
flags.DEFINE_enum("calibration", defaults.CALIBRATION, ["mse", "lsq"], "Scale initialisation.")
flags.DEFINE_enum("calibration_source", defaults.CALIBRATION_SOURCE, ["float", "quantized"],
                  "Activations the input steps are fitted to: the float network's, or the "
                  "quantized network's, layer by layer (for 3-4 bit edge models).")
flags.DEFINE_integer("calibration_batches", defaults.CALIBRATION_BATCHES,
                     "Batches of the training stream used to calibrate activation steps.")
flags.DEFINE_integer("steps", defaults.QAT_STEPS, "Steps of the run's own stage.")
flags.DEFINE_integer("erm_steps", defaults.ERM_STEPS, "Steps of the ERM stage before QAT.")
flags.DEFINE_integer("batch_per_domain", defaults.BATCH_PER_DOMAIN, "Images per training domain.")
flags.DEFINE_float("lr", defaults.LR, "Weight learning rate (Adam).")
flags.DEFINE_float("scale_lr", defaults.SCALE_LR, "Scale learning rate (Adam, no decay).")
flags.DEFINE_float("weight_decay", defaults.WEIGHT_DECAY, "Weight decay of the weights.")
flags.DEFINE_enum("weight_decay_mode", defaults.WEIGHT_DECAY_MODE, ["coupled", "decoupled"],
                  "coupled: L2 on the final combined gradient before Adam's moments (the "
                  "reference code's torch Adam); decoupled: Keras's AdamW-style decay.")
flags.DEFINE_float("rho", defaults.RHO, "SAM/SAGM radius rho.")
flags.DEFINE_float("alpha", defaults.ALPHA, "SAGM alpha.")
flags.DEFINE_integer("freeze_interval", defaults.FREEZE_INTERVAL, "K: steps per disorder window.")
flags.DEFINE_float("freeze_threshold", defaults.FREEZE_THRESHOLD, "r: disorder threshold.")
flags.DEFINE_integer("gradient_window", None,
                     "N: steps per row of gradients.csv (summed g_va, g_flat, applied); "
                     "default K (--freeze_interval).")
flags.DEFINE_integer("seed", 0, "Seed: hold-out split, data order, initialisation.")
flags.DEFINE_float("holdout_fraction", defaults.HOLDOUT_FRACTION, "Validation hold-out.")
flags.DEFINE_bool("skip_bad_files", False, "Skip unreadable image files instead of failing.")
flags.DEFINE_string("output_dir", None, "Run directory (default runs/<setting>/<test>/seed<k>).")
flags.DEFINE_string("erm_cache_dir", None,
                    "Where ERM stages are kept for reuse (default: beside output_dir).")
flags.DEFINE_integer("eval_every", defaults.EVAL_EVERY, "Steps between evaluations/checkpoints.")
flags.DEFINE_integer("eval_after", 0, "No evaluation before this step (DomainNet: 45000).")
flags.DEFINE_integer("eval_batch_size", defaults.EVAL_BATCH_SIZE, "Evaluation batch size.")
flags.DEFINE_bool("smoke", False, "Shrink any configuration to a seconds-long plumbing run "
                  "(2 eager steps, ResNet-18 of width 8 at 32 px in place of a ResNet, random init).")
flags.DEFINE_bool("jit_compile", False, "Compile the train step with XLA.")
flags.DEFINE_bool("mixed_precision", False, "bfloat16 compute (GPU only).")
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multiworker"],
                  "tf.distribute strategy.")
flags.DEFINE_bool("deterministic", False, "Enable TF op determinism (exact resume).")
flags.DEFINE_integer("verbose", 1, "0 silent, 1 progress bars.")
flags.DEFINE_bool("check_only", False, "Compare the settings with --output_dir's run and exit: "
                  "0 free or the same run, 3 a run with other settings. Starts nothing.")

# Flags of this program that are not settings of the run.
NOT_SETTINGS = ("check_only",)
DEFAULT_BACKBONES = {"rotated_mnist": "mnist_cnn", "rotated_mnist_5k": "mnist_cnn"}
# --smoke: a plumbing run of any configuration in seconds on a CPU. Steps run eagerly (tracing
# a two-pass ResNet step costs far more than running four of them), a ResNet-50 becomes a
# width-8 ResNet-18 on 32 x 32 images, and the initialisation is random.
SMOKE = {"steps": 2, "erm_steps": 2, "eval_every": 2, "batch_per_domain": 2,
         "freeze_interval": 2, "calibration_batches": 1, "eval_batch_size": 16,
         "photo_image_size": 32, "resnet_width": 8, "backbone": {"resnet50": "resnet18"}}


def _usage(flag, message):
    raise cli.UsageError(f"--{flag}: {message}")


def _float_method(name):
    from fqat_tf import methods

    return name in methods.METHODS and not methods.METHODS[name].quantized


def _resolve_method(s):
    from fqat_tf import methods

    method = s["method"]
    if method in methods.ALIASES:
        base, quantizer = methods.ALIASES[method]
        if s["quantizer"] not in (None, quantizer):
            _usage("quantizer", f"--method={method} implies --quantizer={quantizer}, "
                                f"got --quantizer={s['quantizer']}")
        s["method"], s["quantizer"] = base, quantizer
    if s["method"] not in methods.METHODS:
        _usage("method", f"unknown method {method!r}; choose from "
                         f"{sorted(methods.METHODS) + sorted(methods.ALIASES)}")
    if s["ewgs_delta_mode"] == "hessian" and s["quantizer"] != "ewgs":
        _usage("ewgs_delta_mode", "hessian mode refreshes EWGS deltas; it needs --quantizer=ewgs")
    if _float_method(s["method"]) and s["quantizer"] is not None:
        _usage("quantizer", f"--method={s['method']} trains a full-precision model; "
                            f"drop --quantizer")
    s["quantizer"] = s["quantizer"] or defaults.QUANTIZER


def _check_ranges(s):
    for name in ("weight_bits", "activation_bits"):
        if not defaults.MIN_BITS <= s[name] <= defaults.MAX_BITS:
            _usage(name, f"must be in {defaults.MIN_BITS}..{defaults.MAX_BITS}, got {s[name]}")
    for name in ("steps", "batch_per_domain", "eval_every", "calibration_batches",
                 "eval_batch_size"):
        if s[name] < 1:
            _usage(name, f"must be >= 1, got {s[name]}")
    if s["gradient_window"] is not None and s["gradient_window"] < 1:
        _usage("gradient_window", f"must be >= 1, got {s['gradient_window']}")
    if s["erm_steps"] < 0:
        _usage("erm_steps", f"must be >= 0, got {s['erm_steps']}")
    for name in ("lr", "scale_lr"):
        if not s[name] > 0:
            _usage(name, f"must be > 0, got {s[name]}")
    for name in ("weight_decay", "rho", "alpha", "eval_after"):
        if s[name] < 0:
            _usage(name, f"must be >= 0, got {s[name]}")
    if s["freeze_interval"] < 2:
        _usage("freeze_interval", f"must be >= 2 (a disorder needs two signs), "
                                  f"got {s['freeze_interval']}")
    if not 0.0 <= s["freeze_threshold"] <= 1.0:
        _usage("freeze_threshold", f"must be in [0, 1], got {s['freeze_threshold']}")
    if not 0.0 <= s["holdout_fraction"] < 1.0:
        _usage("holdout_fraction", f"must be in [0, 1), got {s['holdout_fraction']}")
    if s["eval_after"] >= s["steps"]:
        _usage("eval_after", f"{s['eval_after']} leaves no evaluation in {s['steps']} steps")


def _check_data_and_model(s):
    from fqat_tf import data, models

    if s["dataset"] not in data.DATASETS:
        _usage("dataset", f"unknown dataset {s['dataset']!r}; choose from {sorted(data.DATASETS)}")
    info = data.DATASETS[s["dataset"]]
    s["backbone"] = s["backbone"] or DEFAULT_BACKBONES.get(s["dataset"], "resnet50")
    if s["backbone"] not in models.BACKBONES:
        _usage("backbone", f"unknown backbone {s['backbone']!r}; choose from "
                           f"{sorted(models.BACKBONES)}")
    if s["image_size"] is not None and not info.imagenet:
        _usage("image_size", f"{s['dataset']} has a fixed input size {info.input_shape}")
    if info.domains:
        try:
            s["test_domains"] = list(data.resolve_domains(s["test_domains"], info.domains))
        except data.DataError as e:
            _usage("test_domains", str(e))
    if not s["test_domains"]:
        _usage("test_domains", "give at least one test domain")
    init = s["init"]
    if not (init in ("none", "imagenet") or init.startswith("mocov2:")):
        _usage("init", f"expected none, imagenet or mocov2:PATH, got {init!r}")
    if not _float_method(s["method"]) and s["erm_steps"] == 0 and init == "none":
        logging.warning("--erm_steps=0 with --init=none: QAT starts from random weights")


def _check_runtime(s):
    if s["mixed_precision"]:
        import tensorflow as tf

        if not tf.config.list_physical_devices("GPU"):
            _usage("mixed_precision", "bfloat16 mixed precision is a GPU option; no GPU is "
                                      "visible")


def _apply_smoke(s):
    for key in ("steps", "erm_steps", "eval_every", "batch_per_domain", "freeze_interval",
                "calibration_batches", "eval_batch_size"):
        s[key] = min(s[key], SMOKE[key])
    s["eval_after"] = 0
    s["init"] = "none"
    from fqat_tf import data

    if data.DATASETS[s["dataset"]].imagenet:
        s["image_size"] = SMOKE["photo_image_size"]
    s["backbone"] = SMOKE["backbone"].get(s["backbone"], s["backbone"])
    if s["backbone"].startswith("resnet"):
        s["width"] = SMOKE["resnet_width"]


def _default_output_dir(s):
    tag = s["method"] if _float_method(s["method"]) else (
        f"{s['method']}_{s['quantizer']}_w{s['weight_bits']}a{s['activation_bits']}"
        + ("_int8" if s["int8_storage"] else ""))
    test = "+".join(str(d).replace(" ", "_") for d in s["test_domains"])
    return os.path.join("runs", f"{s['dataset']}_{tag}", test, f"seed{s['seed']}")


def settings_from_flags(flag_values=FLAGS):
    """The resolved settings dict of one run; raises cli.UsageError naming a bad flag."""
    names = [f for f in flag_values.get_key_flags_for_module(sys.modules[__name__])
             if f.name not in NOT_SETTINGS]
    s = {f.name: f.value for f in names}
    present = {f.name for f in names if f.present}
    _resolve_method(s)
    if _float_method(s["method"]):
        for name in ("weight_bits", "activation_bits", "per_channel", "freeze_interval",
                     "freeze_threshold", "int8_storage", "gradient_window", "shared_inputs"):
            if name in present:
                _usage(name, f"--method={s['method']} trains a full-precision model without "
                             f"quantizers or freezing; drop --{name}")
    _check_data_and_model(s)
    if s["smoke"]:
        _apply_smoke(s)
    _check_ranges(s)
    _check_runtime(s)
    s["output_dir"] = s["output_dir"] or _default_output_dir(s)
    if s["erm_cache_dir"] is None:
        s["erm_cache_dir"] = os.path.join(os.path.dirname(os.path.abspath(s["output_dir"])),
                                          "erm_cache")
    return s


def _check_only(s):
    from fqat_tf import trainer

    try:
        state = trainer.check_settings(s, s["output_dir"])
    except trainer.RunError as e:
        print(f"{PROG}: conflict: {e}", file=sys.stderr)
        return EXIT_CONFLICT
    print(f"{s['output_dir']}: {state}")
    return 0


def _main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {argv[1:]}; flags start with --")
    settings = settings_from_flags()
    if FLAGS.check_only:
        return _check_only(settings)
    from fqat_tf import runtime

    if settings["deterministic"]:
        # Before the train function is compiled.
        runtime.enable_determinism()
    if settings["strategy"] == "multiworker":
        # Its collective ops are configured at start-up, before TensorFlow runs any op; a bad
        # cluster is refused here, before any run directory is made.
        runtime.strategy("multiworker")
    _check_runtime(settings)
    from fqat_tf import trainer

    results = trainer.run(settings)
    print(json.dumps({k: results[k] for k in ("val_avg", "test_avg", "selected_step", "diverged")
                      if k in results}))
    return 0


def main(argv):
    verbosity = (cli.verbosity_name(FLAGS.verbosity) if FLAGS["verbosity"].present
                 else cli.DEFAULT_VERBOSITY)
    cli.configure_logging(verbosity)
    sys.exit(cli.run(PROG, lambda: _main(argv), verbosity))


def parse_flags(argv):
    """absl's flag parsing with the project's usage-error convention (the error, a hint)."""
    try:
        return FLAGS(cli.absl_argv(argv))
    except flags.Error as e:
        cli.usage_error(PROG, str(e))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
