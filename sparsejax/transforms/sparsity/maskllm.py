"""MaskLLM (Fang et al., NeurIPS 2024): learned N:M masks, one categorical distribution
over the C(m, n) candidates of every group, sampled with Gumbel-softmax in training and
taken by argmax in inference (docs/methods.md §2)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp

from sparsejax.sparsity import (
    MASK_PRIORS,
    argmax_nm_mask,
    gumbel_nm_mask,
    init_mask_logits,
    linear_schedule,
    mask_entropy,
)
from sparsejax.transforms.base import (
    Context,
    Metrics,
    ParamGroup,
    Site,
    SpecError,
    State,
    View,
    register,
)
from sparsejax.transforms.sparsity.nm import NMPattern

__all__ = ["MASK_PRIORS", "MaskLLM"]

sg = jax.lax.stop_gradient


@register("sparsity", "maskllm")
@dataclass(frozen=True, kw_only=True)
class MaskLLM(NMPattern):
    """Learned N:M masks.

    Gumbel-softmax temperature ``tau_start -> tau_end``, logit scale ``kappa_start ->
    kappa_end`` and regulariser weight ``reg_start -> 0``, all linear over
    ``schedule_steps`` training calls (0: the run's ``train.steps``); logits start
    N(0, ``logit_std``) plus, with ``prior: magnitude``, ``prior_strength`` times that std
    per kept position shared with the magnitude mask of the weight at set-up.
    ``freeze_weights``: the optimiser trains the mask logits only (the paper's mask-only
    mode); ``mask_lr_mult``: the logits' learning rate relative to ``optimizer.lr``. Both
    act on the whole optimiser, so every MaskLLM rule of a config must agree on them.

    State: the call counter ``step`` (drives the schedules and keys the Gumbel draws, so a
    resumed run draws the same masks). Metrics of a training call: the regulariser term
    ``-lambda * sum (W * M)^2`` (a loss term: W held constant, its gradient reaches the
    logits only), mean candidate entropy (nats), mean |soft - hard| mask gap, tau, kappa.
    """

    tau_start: float = 4.0
    tau_end: float = 0.05
    kappa_start: float = 100.0
    kappa_end: float = 500.0
    reg_start: float = 1e-5
    schedule_steps: int = 0
    logit_std: float = 0.01
    prior: str = "magnitude"
    prior_strength: float = 3.0
    freeze_weights: bool = False
    mask_lr_mult: float = 1.0

    loss_terms = ("regularizer",)
    optimizer_fields = ("freeze_weights", "mask_lr_mult")

    def check(self) -> None:
        super().check()
        for name in ("tau_start", "tau_end", "kappa_start", "kappa_end", "mask_lr_mult"):
            if not getattr(self, name) > 0:
                raise SpecError(name, f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("reg_start", "logit_std", "prior_strength", "schedule_steps"):
            if getattr(self, name) < 0:
                raise SpecError(name, f"{name} must be >= 0, got {getattr(self, name)}")
        if self.prior not in MASK_PRIORS:
            raise SpecError("prior", f"prior '{self.prior}' is not one of "
                            f"{'|'.join(MASK_PRIORS)}")

    def bind(self, total_steps: int | None) -> MaskLLM:
        steps = self.schedule_steps or total_steps or 0
        if steps <= 0:
            raise SpecError("schedule_steps", "maskllm needs schedule_steps > 0 (or the "
                            "run's train.steps)")
        return replace(self, schedule_steps=steps)

    def params(self, site: Site, x: jax.Array | None, key: jax.Array) -> State:
        return {"mask_logits": init_mask_logits(
            key, x, self.n, self.m, 0, std=self.logit_std, prior=self.prior,
            prior_strength=self.prior_strength)}

    def param_axes(self, site: Site, kernel_axes: tuple[str | None, ...]
                   ) -> dict[str, tuple[str | None, ...]]:
        # logits (out, in // m, C) follow their kernel: its out axis, then the groups of
        # its in axis (whole groups per device), candidates unsplit
        return {"mask_logits": (kernel_axes[1], kernel_axes[0], None)}

    def param_group(self) -> ParamGroup:
        return ParamGroup("mask_logits", self.mask_lr_mult, self.freeze_weights)

    def init(self, site: Site, x: jax.Array | None, key: jax.Array) -> State:
        return {"step": jnp.zeros((), jnp.uint32)}

    def apply(self, x: jax.Array, params: State, state: State, site: Site, ctx: Context
              ) -> tuple[jax.Array, State, Metrics]:
        logits = params["mask_logits"]
        if not ctx.training:
            return x * argmax_nm_mask(logits, self.n, self.m, 0), state, {}
        step, total = state["step"], self.schedule_steps
        tau = linear_schedule(self.tau_start, self.tau_end, step, total)
        kappa = linear_schedule(self.kappa_start, self.kappa_end, step, total)
        lam = linear_schedule(self.reg_start, 0.0, step, total)
        soft = gumbel_nm_mask(logits, jax.random.fold_in(ctx.key, step), tau, kappa,
                              n=self.n, m=self.m, axis=0)
        hard = argmax_nm_mask(logits, self.n, self.m, 0)
        # The regulariser rewards keeping large weights by moving the *mask*: W is held
        # constant in it (as in the reference code, which squares the detached weight
        # times the mask), so in joint training it does not also push |W| up.
        metrics = {"regularizer": -lam * jnp.sum(jnp.square(sg(x) * soft)),
                   "entropy": mask_entropy(sg(logits), kappa),
                   "soft_hard_gap": jnp.mean(jnp.abs(sg(soft) - hard)),
                   "tau": tau, "kappa": kappa}
        return x * soft, {**state, "step": step + 1}, metrics

    def step_metrics(self, site: Site, before: View, after: View) -> Metrics:
        """Realised sparsity and flip rate of the argmax (inference) masks."""
        old = self.inference_weight(before.x, before.params, before.state, site) != 0
        w_eff = self.inference_weight(after.x, after.params, after.state, site)
        return {"sparsity": jnp.mean(w_eff == 0), "flip_rate": jnp.mean(old != (w_eff != 0))}

    def snapshot(self, site: Site, view: View) -> jax.Array:
        """The argmax candidate of every group."""
        return jnp.argmax(view.params["mask_logits"], -1)
