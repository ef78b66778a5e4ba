"""The refusals of `adapt` (each raises DataError before anything is written) and the checks it passed, in words.

- OOD: more images flagged by the guard than allowed (in core, first);
- BatchNorm (:func:`check_batchnorm`): a pure prevalence shift (AdaBN would fold the class shares into every layer),
  a re-estimation that moves the estimated prevalence outside its 95% CI (the site's class shares differ from
  training's, so the new statistics carry them), or features that moved away from validation;
- prior (:func:`check_prior`): EM not converged, an estimate at the edge of [0, 1], a CI wider than allowed;
- mixture (:func:`check_mixture`): a fit that the new scores reject, that hit its limits, whose classes barely
  separate, or whose cut is so uncertain that many decisions hinge on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medtransfer.errors import DataError
from medtransfer.evaluation.shift_tests import PREVALENCE

__all__ = ["MAX_PRIOR_CI", "check_batchnorm", "check_mixture", "check_prior", "passed_checks"]

MAX_PRIOR_CI = 0.4  # widest acceptable 95% CI of the estimated prevalence
PRIOR_EDGE = 0.02  # an estimate this close to 0 or 1 is implausible for a site that sends images of both kinds
MIN_GOODNESS_P = 0.01  # a mixture the new scores reject at this level does not describe them
MAX_UNCERTAIN_SHARE = 0.2  # at most this share of decisions may hinge on the bootstrap spread of the cut
MAX_PREVALENCE_MOVE = 0.05  # BatchNorm may move the estimated prevalence this far when it has no CI
MIN_SEPARATION = 0.75  # fitted class-conditional AUC below this: no two-class structure left to fit


def check_batchnorm(before: dict[str, Any], after: dict[str, Any], data: Path) -> None:
    """Refuse BatchNorm statistics that cannot help or that moved the images away from validation (nothing written).

    AdaBN normalises with the new site's statistics, which mix its class shares into every layer: under a
    pure prevalence shift it changes what the model calls. And its purpose is to make the new images look
    like the validation images to the later layers: if the feature distance to validation (MMD z, against
    validation matched to the estimated prevalence) grows, the adaptation made things worse."""
    if before["kind"] == PREVALENCE:
        raise DataError(f"--data {data}: the images differ from validation only as a change of prevalence would make them "
                        "differ; BatchNorm statistics of this site would fold its class shares into the normalisation and "
                        "change what the model calls; nothing written. Use --method prior")
    moved = _prevalence_moved(before["prior"], after["prior"])
    if moved:
        raise DataError(f"--data {data}: BatchNorm statistics of these images {moved}: AdaBN assumes the site's class shares "
                        f"match validation's ({before['prior']['source_prior']:.3f} positive), and folds different shares into "
                        "the normalisation, which changes what the model calls; nothing written. Use --method mixture or "
                        "prior, or label images and run recalibrate")
    z_before = before["matched_reference"]["features_mmd"].get("z")
    z_after = after["matched_reference"]["features_mmd"].get("z")
    if z_before is not None and z_after is not None and z_after > max(z_before, 3.0):
        raise DataError(f"--data {data}: after BatchNorm re-estimation the images are further from the validation images "
                        f"(feature MMD z {z_before:.1f} -> {z_after:.1f}, validation matched to the estimated prevalence); "
                        "the adaptation would make the model worse; nothing written. Use --method prior, or label images "
                        "and run recalibrate")


def _prevalence_moved(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Words for a BatchNorm re-estimation that moved the estimated prevalence outside its own 95% CI before it
    (or by more than MAX_PREVALENCE_MOVE without a CI); '' when it stayed."""
    ci = before.get("em_ci")
    low, high = ci if ci else (before["em"] - MAX_PREVALENCE_MOVE, before["em"] + MAX_PREVALENCE_MOVE)
    if low <= after["em"] <= high:
        return ""
    return (f"moved the estimated prevalence from {before['em']:.3f} [{low:.3f}, {high:.3f}] to {after['em']:.3f}, "
            "outside its interval")


def check_mixture(fitted: dict[str, Any], max_ci: float, data: Path) -> None:
    """Refuse a mixture fit that does not describe the scores or is too uncertain to move the threshold on."""
    fit, problems = fitted["fit"], []
    if not fit["converged"] or fit["at_bound"]:
        problems.append("the fit did not converge inside its limits (the classes pushed together as far as allowed)")
    if fitted["goodness_of_fit"]["p_value"] < MIN_GOODNESS_P:
        problems.append(f"the new scores reject the fitted mixture (KS p = {fitted['goodness_of_fit']['p_value']:.2g})")
    if fitted["separation_auc"] < MIN_SEPARATION:
        problems.append(f"the fitted classes barely separate (AUC {fitted['separation_auc']:.2f} < {MIN_SEPARATION})")
    ci = fitted.get("prevalence_ci")
    if ci and ci[1] - ci[0] > max_ci:
        problems.append(f"the prevalence's 95% CI {ci[0]:.3f}-{ci[1]:.3f} is wider than {max_ci}")
    if fitted.get("uncertain_share", 0.0) > MAX_UNCERTAIN_SHARE:
        problems.append(f"{fitted['uncertain_share']:.0%} of the decisions change within the cut's 95% CI "
                        f"(limit {MAX_UNCERTAIN_SHARE:.0%})")
    if problems:
        raise DataError(f"--data {data}: the shifted-mixture fit is not reliable ({'; '.join(problems)}); nothing written. "
                        "Use more images, or label images and run recalibrate")


def check_prior(prior: dict[str, Any], max_ci: float, data: Path) -> None:
    """Refuse an implausible prior estimate (nothing is written)."""
    ci, estimate = prior.get("em_ci"), prior["em"]
    problems = []
    if not prior["em_converged"]:
        problems.append("EM did not converge")
    if not PRIOR_EDGE <= estimate <= 1 - PRIOR_EDGE:
        problems.append(f"the estimate {estimate:.3f} is at the edge of [0, 1]")
    if ci and ci[1] - ci[0] > max_ci:
        problems.append(f"its 95% CI {ci[0]:.3f}-{ci[1]:.3f} is wider than {max_ci}")
    if problems:
        raise DataError(f"--data {data}: the new site's prevalence cannot be estimated reliably ({'; '.join(problems)}); "
                        "nothing written. Use more images, --method bn, or label images and run recalibrate")


def passed_checks(before: dict[str, Any], after: dict[str, Any], prior: dict[str, Any] | None, images: int, min_images: int,
            max_ood_share: float, max_prior_ci: float, uses_bn: bool, fitted: dict[str, Any] | None = None) -> list[str]:
    """The safety checks this adaptation passed, in words (adaptation.json "checks")."""
    ood = before.get("ood")
    checks = [f"OOD guard: {ood['flagged_fraction']:.1%} of the images flagged (limit {max_ood_share:.0%})" if ood else
              "no OOD guard in this model: foreign images were not looked for"]
    if uses_bn:
        z0, z1 = (d["matched_reference"]["features_mmd"].get("z") for d in (before, after))
        p0, p1 = before["prior"], after["prior"]
        checks.append(f"BatchNorm: estimated prevalence {p0['em']:.3f} -> {p1['em']:.3f} (refused outside "
                      + (f"{p0['em_ci'][0]:.3f}-{p0['em_ci'][1]:.3f})" if p0.get("em_ci") else f"+-{MAX_PREVALENCE_MOVE})"))
        checks.append(f"BatchNorm: {images} images (minimum {min_images}); feature MMD z to validation at the estimated "
                      f"prevalence {'n/a' if z0 is None else f'{z0:.1f}'} -> {'n/a' if z1 is None else f'{z1:.1f}'} "
                      "(refused if it grows beyond 3)")
    if prior:
        ci = prior.get("em_ci")
        checks.append(f"prevalence {prior['em']:.3f}" + (f", 95% CI {ci[0]:.3f}-{ci[1]:.3f} (width limit {max_prior_ci})" if ci
                      else "") + f", within [{PRIOR_EDGE}, {1 - PRIOR_EDGE}]; EM converged; BBSE "
                      + ("n/a" if prior.get("bbse") is None else f"{prior['bbse']:.3f}"))
    if fitted:
        ci, cut_ci = fitted.get("prevalence_ci"), fitted.get("cut_ci")
        checks.append(f"mixture: KS p = {fitted['goodness_of_fit']['p_value']:.2g} (refused below {MIN_GOODNESS_P}); fitted "
                      f"class separation AUC {fitted['separation_auc']:.3f} (>= {MIN_SEPARATION}); prevalence "
                      f"{fitted['fit']['prevalence']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
                      + (f"; cut {fitted['cut']:.2f} [{cut_ci[0]:.2f}, {cut_ci[1]:.2f}], {fitted['uncertain_share']:.1%} of "
                         f"the decisions within it (limit {MAX_UNCERTAIN_SHARE:.0%})" if cut_ci else ""))
    return checks
