"""scipy-style :func:`minimize`: an ask/tell loop (:class:`zoptim.blackbox.AskTell`) over a
function of a NumPy vector, with the run's stopping rules and the defaults it gives each method
for its budget. The same iterates, bit for bit, as ``step(closure)`` for the same seed and
hyper-parameters (tested)."""

from __future__ import annotations

import inspect
import math
import numbers
import time
from collections.abc import Callable

import numpy as np
import torch

from .blackbox import (
    DIVERGED_STEPS,
    RUN_OPTIONS,
    AskTell,
    OptimizeResult,
    _as_vector,
    _build,
    _check_vector_options,
    _defaults_for_budget,
    _positive,
    _scalar,
)
from .optim.step import DivergedError
from .runloop import progress_bar

_MESSAGES = {
    1: "Maximum number of function evaluations has been exceeded.",
    2: "Maximum number of iterations has been exceeded.",
    3: "Time limit (options['timeout']) reached.",
    4: "The final point is not finite: x has NaN/inf entries or f(x) is NaN/inf (see x_best, fun_best).",
    5: "The run diverged: too many steps in a row were skipped (non-finite values or updates); x is the last "
       "finite iterate.",
    6: "The run diverged: every value of {steps} steps in a row exceeded f(x0) + {factor:g} * (|f(x0)| + 1) = "
       "{limit:.4g}; x is the last iterate (lower lr or eps; x_best is the best point seen).",
    99: "`callback` stopped the run.",
}


def _callback_wants_result(callback) -> bool:
    try:
        return "intermediate_result" in inspect.signature(callback).parameters
    except (TypeError, ValueError):
        return False


def minimize(
    fun: Callable[..., float],
    x0,
    args: tuple = (),
    method: str = "as2p",
    bounds=None,
    tol: float | None = None,
    callback: Callable | None = None,
    options: dict | None = None,
) -> dict:
    """Minimise ``fun(x, *args)`` from ``x0`` with a zeroth-order method, like ``scipy.optimize.minimize``.

    Args:
        fun: f(x, *args) -> float, x a 1-D float64 NumPy array (a fresh copy each call). A NaN or
            infinite value is skipped as in ``step()`` (no update, a ``NonFiniteLossWarning``;
            ``max_nonfinite`` = 10 in a row raise RuntimeError); a value that is not a real
            scalar raises TypeError.
        x0: the starting point, a non-empty 1-D array of finite real numbers.
        args: extra positional arguments for ``fun``.
        method: ``"as2p"`` (default), ``"zosgd"``, ``"stp"``, ``"s2p"`` or ``"hizoo"``; the
            memory-free momentum is an option of zosgd and as2p (``momentum=0.9``).
        bounds: box bounds, a ``scipy.optimize.Bounds`` or one ``(low, high)`` pair per variable
            (``None`` for no bound). Handled by projection: ``fun`` is evaluated at the query
            point clipped to the box, and each iterate is clipped after its update. An ``x0``
            outside the box is clipped, with a warning.
        tol: stop (success) when the best value has improved by less than
            ``tol * max(1, |best|)`` over the last ``options["patience"]`` steps (default 100).
        callback: called after every step, as ``callback(xk)`` or, if its parameter is named
            ``intermediate_result``, with an OptimizeResult (``x``, ``fun`` = the step's loss,
            ``nit``, ``nfev``, ``x_best``, ``fun_best``). Returning a true value (True, 1, numpy.bool_(True)) or raising
            ``StopIteration`` stops the run (status 99).
        options: run options ``maxfev`` (evaluations in all, default 10,000, the final
            evaluation at x included; a step is only started if it fits), ``maxiter`` (steps),
            ``ftarget`` (stop, success, as soon as a value <= ftarget is seen), ``timeout``
            (seconds), ``patience`` (steps, for ``tol``), ``divergence`` (default 1,000: stop,
            status 5, once every value of 10 steps in a row exceeds
            ``f(x0) + divergence * (|f(x0)| + 1)``; None: never), ``progress`` (or ``disp``: a tqdm
            progress bar on stderr), and the method's hyper-parameters (``seed``, ``eps``,
            ``lr``, ``eta_b``, ...; see the optimizer classes). ``total_steps`` defaults to the
            steps the budget allows (AS2P, S2P's stationary rules). AS2P, the default method,
            defaults to ``eps = 0.1 * max(1, rms(x0))`` and the cosine schedules over that budget
            (``batch_mode="minibatch"``: rho from eps to eps / 10, the step's lr from eps to 0);
            pass ``batch_mode="full"`` for the paper's full-batch mode (constant rho = lr).
            These defaults were chosen from measurements on six problems
            (``benchmarks/minimize_defaults.py``; README, "Functions of a vector").

    Returns:
        ``scipy.optimize.OptimizeResult`` (a compatible dict when scipy is missing) with ``x`` (the
        final iterate), ``fun`` (f(x), one evaluation), ``nfev``, ``nit``, ``success``,
        ``status`` (0 converged or ftarget reached, 1 maxfev, 2 maxiter, 3 timeout, 4 the final
        point or its value is not finite after a stop that would be a success, 5 diverged: ``max_nonfinite``
        skipped steps in a row, or values far above f(x0), see ``divergence``; 99 callback),
        ``message``, ``x_best``/``fun_best`` (the best point evaluated, perturbed query points
        included) and ``loss_history`` (every value of fun, in order). Note that, as in scipy,
        using up the budget is ``success=False``. With a noisy ``fun``, ``fun_best`` is the
        minimum of noisy samples, so it is biased low (a lucky draw); ``fun`` (one evaluation at
        the final iterate) is not, and ``x_best`` should be re-evaluated before it is trusted.

    Example:
        >>> res = zoptim.minimize(lambda x: float(((x - 1) ** 2).sum()), np.zeros(10),
        ...                       options={"maxfev": 2000, "eps": 0.05})
    """
    if not callable(fun):
        raise TypeError(f"fun must be callable; got {type(fun).__name__}")
    if not isinstance(args, tuple):
        args = (args,)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None; got {type(callback).__name__}")
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options must be a dict; got {type(options).__name__}")
    hp = dict(options or {})
    run_opts = {k: hp.pop(k) for k in RUN_OPTIONS if k in hp}
    name = _check_vector_options(method, hp, extra_names=RUN_OPTIONS)
    maxfev = _positive("maxfev", run_opts.get("maxfev", 10_000), integer=True)
    maxiter = _positive("maxiter", run_opts.get("maxiter"), integer=True)
    timeout = _positive("timeout", run_opts.get("timeout"))
    patience = _positive("patience", run_opts.get("patience", 100), integer=True)
    tol = None if tol is None else _positive("tol", tol)
    ftarget = run_opts.get("ftarget")
    if ftarget is not None and (not isinstance(ftarget, numbers.Real) or isinstance(ftarget, bool) or math.isnan(ftarget)):
        raise ValueError(f"options['ftarget'] must be a real number; got {ftarget!r}")
    progress = bool(run_opts.get("progress", run_opts.get("disp", False)))
    divergence = _positive("divergence", run_opts.get("divergence", 1e3))

    x = _as_vector(x0)
    probe = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))  # a step's queries, asked of the method itself
    qps = _build(name, probe, _defaults_for_budget(name, hp, 1, x)).queries_per_step
    if maxfev < qps + 1:
        raise ValueError(f"options['maxfev'] = {maxfev} is below one step of {name!r} ({qps} evaluations) plus the final one")
    steps = (maxfev - 1) // qps
    if maxiter is not None:
        steps = min(steps, maxiter)
    at = AskTell(name, x, bounds=bounds, **_defaults_for_budget(name, hp, steps, x))  # checks and applies the bounds
    x = at._vector.detach().numpy().copy()  # x0, clipped to the bounds

    def evaluate(point: np.ndarray) -> float:
        return _scalar(fun(point, *args), "fun(x)")

    history: list[float] = []
    best, x_best = math.inf, x.copy()
    best_at_step: list[float] = []
    far_steps, step_min = 0, math.inf
    status = None
    message = ""
    nit = 0
    wants_result = callback is not None and _callback_wants_result(callback)
    # The loop drives the method's steps (StepRun) itself, as AskTell.ask/tell would one point at a
    # time (same moves, same values told, same bounds handling), without their per-call checks.
    opt, vector, box, slot = at.optimizer, at._vector.detach().numpy(), at._box, at._slot
    append, run = history.append, None
    start = time.monotonic()
    bar = progress_bar(maxfev, f"zoptim {name}", progress, unit="eval")
    grad_mode = torch.is_grad_enabled()
    torch.set_grad_enabled(False)  # for the moves and updates (fun gets NumPy copies); restored below
    try:
        while status is None:
            if run is None or run.done:
                if len(history) + qps + 1 > maxfev:
                    status = 1
                    break
                if maxiter is not None and nit >= maxiter:
                    status = 2
                    break
                step_min = math.inf
                run = slot.run = opt.begin_step()
            run.move()
            point = vector.copy()
            if box is not None:  # bounds by projection: the loss is asked at the clipped point
                np.clip(point, box[0], box[1], out=point)
            value = fun(point, *args)
            if type(value) is not float:
                value = _scalar(value, "fun(x)")
            append(value)
            if value < step_min:
                step_min = value
            if progress:
                bar.update(1)
            if value < best:
                best, x_best = value, point
            try:
                run.tell(value)
            except DivergedError as err:  # max_nonfinite steps in a row were skipped: stop, with the last finite iterate
                status, message = 5, f"{_MESSAGES[5]} ({err})"
                break
            if ftarget is not None and value <= ftarget:
                status, message = 0, f"A value <= ftarget ({ftarget}) was reached (x_best)."
                break
            if timeout is not None and time.monotonic() - start > timeout:
                status = 3
                break
            if not run.done:
                continue
            if box is not None:  # a step ended: its iterate is clipped to the box
                np.clip(vector, box[0], box[1], out=vector)
            nit += 1
            best_at_step.append(best)
            if divergence is not None:  # the iterate runs away although every value stays finite
                limit = history[0] + divergence * (abs(history[0]) + 1.0)
                far_steps = far_steps + 1 if step_min > limit else 0
                if far_steps >= DIVERGED_STEPS:
                    status = 5
                    message = _MESSAGES[6].format(steps=DIVERGED_STEPS, factor=divergence, limit=limit)
                    break
            if progress:
                bar.set_postfix(best=f"{best:.4g}", refresh=False)
            if callback is not None:
                xk = vector.copy()
                try:
                    if wants_result:
                        stop = callback(intermediate_result=OptimizeResult(
                            x=xk, fun=opt.last_stats.get("loss"), nit=nit, nfev=len(history),
                            x_best=x_best.copy(), fun_best=best))
                    else:
                        stop = callback(xk)
                except StopIteration:
                    stop = True
                if stop:  # any truthy value stops, as in scipy (True, numpy.bool_(True), 1)
                    status = 99
                    break
            if tol is not None and nit > patience:
                before = best_at_step[-1 - patience]
                if before - best <= tol * max(1.0, abs(best)):
                    status, message = 0, f"The best value improved by less than tol over the last {patience} steps."
    finally:
        torch.set_grad_enabled(grad_mode)
        bar.close()
        at.close()  # a run stopped mid-step goes back to its last iterate

    x_final = at.recommend()
    if np.all(np.isfinite(x_final)):
        fun_final = evaluate(x_final.copy())
        history.append(fun_final)
    else:
        fun_final = math.nan  # not evaluated: fun is not asked at a point with NaN/inf entries
    if fun_final < best:
        best, x_best = fun_final, x_final.copy()
    if not math.isfinite(fun_final):  # never a success; a run that already failed keeps its status
        if status == 0:
            status, message = 4, _MESSAGES[4] + (f" (before: {message})" if message else "")
        else:
            message = (message or _MESSAGES[status]) + " " + _MESSAGES[4]
    return OptimizeResult(
        x=x_final,
        fun=fun_final,
        nfev=len(history),
        nit=nit,
        success=status == 0,
        status=status,
        message=message or _MESSAGES[status],
        x_best=np.asarray(x_best, dtype=np.float64).copy(),
        fun_best=best,
        loss_history=np.asarray(history, dtype=np.float64),
        method=name,
    )
