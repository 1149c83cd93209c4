"""`FQATModel`: a Keras model whose `train_step` runs one of the FQAT methods (docs/algorithm.md §2-3).

It wraps a quantized model, splits its trainable variables into the quantizer scales s and the
rest theta, and trains them with two optimizers: one for theta (Adam with weight decay) and one
for the scales (Adam, lr SCALE_LR, no weight decay). The freeze state lives in a `FreezeState`
sublayer, so `save_weights` and `tf.train.Checkpoint` carry masks, sign windows and counters
together with both optimizers.
"""
import keras
import numpy as np
import tensorflow as tf
from keras.src.losses import loss as loss_module
from keras.src.trainers.data_adapters import data_adapter_utils

from fqat_tf import defaults
from fqat_tf import freeze
from fqat_tf import methods
from fqat_tf import distribute
from fqat_tf import quantize
from fqat_tf import sagm


class _Variables:
    """Holds variable lists outside Keras tracking (tracking would re-own them in the wrapper)."""

    def __init__(self, theta, scales):
        self.theta, self.scales = list(theta), list(scales)


def _all_finite(loss, *grad_lists):
    checks = [tf.reduce_all(tf.math.is_finite(loss))]
    checks += [tf.reduce_all(tf.math.is_finite(g))
               for grads in grad_lists for g in grads if g is not None]
    bad = tf.cast(tf.logical_not(tf.reduce_all(tf.stack(checks))), tf.float32)
    # Every replica must take the same branch, or the optimizer's all-reduce would hang.
    return tf.equal(distribute.all_reduce_sum([bad])[0], 0.0)


def _run_if(pred, true_fn, false_fn, args):
    """`tf.cond` on a replica-identical predicate whose branch may update mirrored variables."""
    if not tf.distribute.has_strategy() or \
            tf.__internal__.distribute.strategy_supports_no_merge_call():
        tf.cond(pred, lambda: true_fn(*args), false_fn)
        return

    # A replica-context cond cannot hold a merge_call (optimizers make one), so branch in
    # cross-replica context, as Keras's LossScaleOptimizer does.
    def merge_fn(distribution, pred, *args):
        first = distribution.experimental_local_results(pred)[0]
        tf.cond(first,
                lambda: distribution.extended.call_for_each_replica(true_fn, args=args),
                lambda: distribution.extended.call_for_each_replica(false_fn))

    tf.distribute.get_replica_context().merge_call(merge_fn, args=(pred,) + tuple(args))


@keras.saving.register_keras_serializable(package="fqat_tf")
class FQATModel(keras.Model):
    """A quantized model trained by one of `methods.METHODS` (default: FQAT).

    Both passes call the model with `training=not freeze_bn`; with frozen BN (the default)
    statistics never change, and the second pass never changes any state in either mode.
    Masks are read inside the compiled step, and the step itself takes the freeze decision
    every K steps once `DisorderFreezeCallback` has set K and r. Weight decay is coupled L2 as
    in the reference code (torch `Adam(weight_decay=wd)`): `wd * theta` is added to the final
    combined gradient of theta before the optimizer, never to the perturbation or the scales
    (docs/algorithm.md §2); pass `weight_decay=0` and an optimizer with its own (decoupled)
    decay for the other form. A step whose loss or gradients are not finite applies nothing
    and stops training with a `FloatingPointError`, so no checkpoint callback ever sees NaN
    weights.

    Args:
        qmodel: a built Keras model, normally `fqat_tf.quantize_model(...)` output.
        method: a key of `fqat_tf.METHODS`.
        rho: SAM radius.
        alpha: SAGM alpha (0.0005 for DomainNet).
        scale_vars: the scale variables; None means `fqat_tf.scale_variables(qmodel)`.
        freeze_interval: K, the largest freeze interval (the callback's default).
        freeze_bn: run BN (and every layer) in inference mode in both passes.
        record_signs: count the sign flips of g_va every step; None means when the method has
            a mask rule. Recording for other methods lets the callback log their disorder.
        weight_decay: coupled L2 coefficient on theta (0 = none).
        track_scale_gradients: accumulate, per scale, the sums of g_va, g_flat and the applied
            gradient in `scale_gradient_sums` ([3, n]; read and reset by the caller).
        **kwargs: passed to `keras.Model`.
    """

    def __init__(self, qmodel, method=defaults.METHOD, rho=defaults.RHO, alpha=defaults.ALPHA,
                 *, scale_vars=None, freeze_interval=defaults.FREEZE_INTERVAL,
                 freeze_bn=defaults.FREEZE_BN, record_signs=None, weight_decay=0.0,
                 track_scale_gradients=False, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(qmodel, keras.Model) or not qmodel.built:
            raise ValueError(f"FQATModel needs a built keras.Model; got {qmodel!r}")
        if not (np.isfinite(rho) and rho >= 0 and np.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"FQATModel needs finite rho >= 0 and alpha >= 0; "
                             f"got rho={rho!r}, alpha={alpha!r}")
        if not (np.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"FQATModel needs a finite weight_decay >= 0; got {weight_decay!r}")
        self.method = methods.get(method)
        self.rho, self.alpha, self.freeze_bn = float(rho), float(alpha), bool(freeze_bn)
        self.weight_decay = float(weight_decay)
        self.freeze_interval = int(freeze_interval)
        self.qmodel = qmodel
        scales = list(quantize.scale_variables(qmodel) if scale_vars is None else scale_vars)
        trainable = list(qmodel.trainable_variables)
        known = {id(v) for v in trainable}
        for s in scales:
            if id(s) not in known:
                raise ValueError(f"scale variable {s.path!r} is not a trainable variable of "
                                 f"{qmodel.name!r}")
        if self.method.quantized and not scales:
            raise ValueError(f"method {self.method.name!r} trains quantizer scales, but "
                             f"{qmodel.name!r} has none; quantize it or use 'erm'/'sagm'")
        if not self.method.quantized and scales:
            raise ValueError(f"method {self.method.name!r} is full precision, but "
                             f"{qmodel.name!r} has {len(scales)} scale variables; use 'lsq', "
                             f"'lsq_sagm' or 'fqat'")
        scale_ids = {id(s) for s in scales}
        self._vars = _Variables([v for v in trainable if id(v) not in scale_ids], scales)
        self.record_signs = (self.method.mask_rule is not None if record_signs is None
                             else bool(record_signs))
        self.freeze_state = freeze.FreezeState(
            scales, self.freeze_interval, track_flat=self.record_signs and self.method.two_pass,
            rule=self.method.mask_rule)
        self.nonfinite_steps = self.add_weight(shape=(), initializer="zeros", dtype="int64",
                                               trainable=False, name="nonfinite_steps")
        self.scale_gradient_sums = self.add_weight(
            shape=(3, len(scales)), initializer="zeros", dtype="float32", trainable=False,
            name="scale_gradient_sums") if track_scale_gradients and scales else None
        self.scale_optimizer = None
        self.built = True

    @property
    def theta_variables(self):
        """Every trainable variable of the wrapped model that is not a scale."""
        return list(self._vars.theta)

    @property
    def scale_variables(self):
        """The quantizer scale variables, in mask order."""
        return list(self._vars.scales)

    def call(self, inputs, training=None):
        """Runs the wrapped model (evaluation and prediction use this)."""
        return self.qmodel(inputs, training=training)

    def compile(self, optimizer=None, scale_optimizer=None, loss=None, metrics=None, **kwargs):
        """Keras `compile` with a second optimizer for the scales.

        Args:
            optimizer: for theta; None means Adam(LR, weight_decay=WEIGHT_DECAY).
            scale_optimizer: for the scales; None means Adam(SCALE_LR), no weight decay. Must
                stay None for a model without scales (`scale_optimizer` is then None).
            loss: as in Keras.
            metrics: as in Keras.
            **kwargs: other `keras.Model.compile` arguments (run_eagerly, jit_compile, ...).
        """
        if optimizer is None:
            optimizer = keras.optimizers.Adam(learning_rate=defaults.LR,
                                              weight_decay=defaults.WEIGHT_DECAY)
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            raise ValueError("FQATModel does not support loss-scaled (mixed_float16) training: "
                             "the perturbation would use scaled gradients")
        if not self._vars.scales:
            if scale_optimizer is not None:
                raise ValueError(f"scale_optimizer given, but method {self.method.name!r} on "
                                 f"{self.qmodel.name!r} has no scale variables")
        elif scale_optimizer is None:
            scale_optimizer = keras.optimizers.Adam(
                learning_rate=defaults.SCALE_LR,
                weight_decay=defaults.SCALE_WEIGHT_DECAY or None)
        else:
            scale_optimizer = keras.optimizers.get(scale_optimizer)
        if scale_optimizer is not None and scale_optimizer is self.optimizer:
            raise ValueError("FQATModel.compile needs two distinct optimizer objects for "
                             "optimizer= and scale_optimizer=")
        self.scale_optimizer = scale_optimizer
        # Built here, on their own variable sets, so checkpoints can restore them before fit.
        self.optimizer.build(self._vars.theta)
        if scale_optimizer is not None:
            scale_optimizer.build(self._vars.scales)

    def get_config(self):
        """The trainer's settings and its wrapped model (a `.keras` file holds both)."""
        config = {"qmodel": keras.saving.serialize_keras_object(self.qmodel),
                  "method": self.method.name, "rho": self.rho, "alpha": self.alpha,
                  "freeze_interval": self.freeze_interval, "freeze_bn": self.freeze_bn,
                  "record_signs": self.record_signs, "weight_decay": self.weight_decay,
                  "track_scale_gradients": self.scale_gradient_sums is not None,
                  "name": self.name}
        default = [id(v) for v in quantize.scale_variables(self.qmodel)]
        if [id(v) for v in self._vars.scales] != default:
            config["scale_paths"] = [v.path for v in self._vars.scales]
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        qmodel = keras.saving.deserialize_keras_object(config.pop("qmodel"),
                                                       custom_objects=custom_objects)
        paths = config.pop("scale_paths", None)
        if paths is not None:
            by_path = {v.path: v for v in qmodel.trainable_variables}
            missing = [p for p in paths if p not in by_path]
            if missing:
                raise ValueError(f"FQATModel config names scale variables {missing} that "
                                 f"{qmodel.name!r} does not have")
            config["scale_vars"] = [by_path[p] for p in paths]
        return cls(qmodel, **config)

    def get_compile_config(self):
        """Keras's compile config and the scale optimizer's."""
        config = super().get_compile_config()
        if config and self.scale_optimizer is not None:
            config["scale_optimizer"] = keras.saving.serialize_keras_object(
                self.scale_optimizer)
        return config

    def compile_from_config(self, config):
        """Compiles as `compile` does (both optimizers built on their own variables), so a
        loaded `.keras` file restores both optimizers' state."""
        self.compile(**keras.saving.deserialize_keras_object(config))

    def train_step(self, data):
        """One step of the method, in Keras's order: passes and loss, apply, metrics.

        Returns:
            The metric results plus `frozen`, the fraction of scale variables whose g_va is
            frozen in this step.
        """
        x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)

        def loss_fn(y_pred):
            return self._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                      training=True)

        masks = self.freeze_state.masks if self.method.masked else None
        grads = sagm.sagm_gradients(
            self.qmodel, x, loss_fn, self._vars.theta, self._vars.scales, masks,
            rho=self.rho, alpha=self.alpha, two_pass=self.method.two_pass,
            training=not self.freeze_bn)
        self._loss_tracker.update_state(
            loss_module.unscale_loss_for_distribution(grads.loss),
            sample_weight=tf.shape(tf.nest.flatten(x)[0])[0])
        step = tf.convert_to_tensor(self.freeze_state.step)
        scale_grads = self.method.scale_gradients(grads, step)
        finite = _all_finite(grads.loss, grads.theta_grads, scale_grads)
        _run_if(finite, self._apply, self._count_nonfinite,
                (list(grads.theta_grads), list(scale_grads), list(grads.g_va),
                 list(grads.g_flat), self._scale_gradient_stats(grads, scale_grads)))
        logs = self.compute_metrics(x, y, grads.y_pred, sample_weight=sample_weight)
        logs["frozen"] = self.freeze_state.frozen_fraction()
        return self._multi_worker_logs(logs)

    def test_step(self, data):
        return self._multi_worker_logs(super().test_step(data))

    def _multi_worker_logs(self, logs):
        """Logs as Keras can reduce them under MultiWorkerMirroredStrategy.

        Keras 3 averages a multi-worker run's per-replica logs along axis 0, which a scalar
        lacks ("Invalid reduction dimension 0 for input with 0 dimensions"); a [1] vector
        averages to the same value.
        """
        if not isinstance(self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return logs
        return {k: tf.reshape(v, [1]) for k, v in logs.items()}

    def _scale_gradient_stats(self, grads, scale_grads):
        """[3, n]: per scale, the sum of g_va, of g_flat and of the gradient that moves it."""
        if self.scale_gradient_sums is None:
            return None
        applied = self.method.applied_gradients(distribute.all_reduce_sum(scale_grads),
                                                tf.convert_to_tensor(self.freeze_state.masks))
        return tf.stack([tf.stack([tf.reduce_sum(tf.cast(t, tf.float32)) for t in part])
                         for part in (grads.g_va, grads.g_flat, applied)])

    def _apply(self, theta_grads, scale_grads, g_va, g_flat, stats):
        pairs = [(g, v) for g, v in zip(theta_grads, self._vars.theta) if g is not None]
        grads = [g for g, _ in pairs]
        if self.weight_decay:
            # Each replica adds its share; the optimizer's sum over replicas gives wd * theta.
            share = self.weight_decay / distribute.num_replicas()
            grads = [g + tf.cast(share, g.dtype) * tf.cast(v, g.dtype) for g, (_, v) in
                     zip(grads, pairs)]
        self.optimizer.apply(grads, [v for _, v in pairs])
        if self._vars.scales:
            self.method.update_scales(self.scale_optimizer, self._vars.scales, scale_grads,
                                      tf.convert_to_tensor(self.freeze_state.masks))
        if stats is not None:
            distribute.replica_update([self.scale_gradient_sums], lambda v, d: v.assign_add(d),
                                      [stats])
        self.freeze_state.record(g_va, self.record_signs, g_flat=g_flat)

    def _count_nonfinite(self):
        distribute.replica_update([self.nonfinite_steps], lambda v, d: v.assign_add(d),
                            [tf.constant(1, tf.int64)])

    def make_train_function(self, force=False):
        """Keras's train function, raising `FloatingPointError` after a skipped step."""
        if self.train_function is not None and not force:
            return self.train_function
        super().make_train_function(force=force)
        compiled = self.train_function

        def train_function(iterator):
            logs = compiled(iterator)
            if int(self.nonfinite_steps.numpy()):
                self.nonfinite_steps.assign(0)
                self.stop_training = True
                raise FloatingPointError(
                    f"FQATModel: non-finite loss or gradient after step "
                    f"{int(self.freeze_state.step.numpy())} (method {self.method.name!r}); "
                    "the update was skipped, so the weights hold their last finite values. "
                    "Lower the learning rate or check the inputs.")
            return logs

        self.train_function = train_function
        return train_function
